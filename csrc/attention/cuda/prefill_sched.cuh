// Work decomposition of paged prefill on CUDA, shared by the tensor-core and the SIMT kernel.
//
// A CTA owns one tile: `rows` query rows of one sequence and one KV head, packed as
// tokens x heads (token-major): the query heads of the KV head's GQA group, times as many
// consecutive new tokens of the sequence as fit. Every K/V row the CTA loads then serves all
// of them. A group larger than a tile is split into head tiles.
//
// The grid is sized on the host from shapes alone (graph-capture safe): sequence s owns the
// tile indices [qsl[s] / T + s, qsl[s + 1] / T + s + 1), T = tokens per tile, which is at least
// ceil(q_len / T) of them; the CTAs past a sequence's last real tile exit at once. So
// num_tokens / T + num_seqs tiles bound every batch, and a CTA finds its sequence by searching
// query_start_loc in device memory. Tiles are handed out from the last index down: the late
// tokens of a sequence see the most keys, and starting them first shortens the tail.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda/attention_cuda.cuh"

namespace sagellm::cuda::prefill {

// n / d for 0 <= n < 2^31 by a multiply and a shift (d >= 1 fixed per launch): with
// p = 31 + ceil(log2 d) and mul = ceil(2^p / d), the rounding error mul * d - 2^p < d <= 2^(p-31)
// is too small to move any n < 2^31 across a multiple of d.
struct FastDiv {
  uint32_t divisor = 1;
  uint32_t mul = 1u << 31;
  uint32_t shift = 31;

  FastDiv() = default;
  explicit FastDiv(int d) : divisor(static_cast<uint32_t>(d)) {
    uint32_t log2_ceil = 0;
    while ((uint64_t{1} << log2_ceil) < divisor) ++log2_ceil;
    shift = 31 + log2_ceil;
    mul = static_cast<uint32_t>(((uint64_t{1} << shift) + divisor - 1) / divisor);
  }
  __host__ __device__ __forceinline__ int div(int n) const {
    return static_cast<int>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * mul) >> shift);
  }
};

struct PrefillSched {
  int group;            // query heads per KV head
  int heads_per_tile;   // hp: query heads packed into one tile's rows
  int head_tiles;       // tiles one group is split into (1 unless group > rows)
  int tokens_per_tile;  // T = rows / hp
  int heads_x;          // num_kv_heads * head_tiles: the fast-varying part of blockIdx.x
  int total_tiles;      // num_tokens / T + num_seqs
  FastDiv div_hp;
  FastDiv div_tokens;
  FastDiv div_block;  // by block_size
  // Scores go to the log2 domain for ex2: s' = s * score_scale, or, with a soft cap,
  // s' = tanh(s * score_scale) * cap_scale (score_scale = scale / cap, cap_scale = cap * log2 e).
  float score_scale;
  float cap_scale;  // 0: no soft cap
};

// Host side: the schedule for tiles of `rows` query rows.
inline PrefillSched make_sched(const PagedAttentionCudaParams& p, int rows) {
  constexpr float kLog2e = 1.4426950408889634f;
  PrefillSched s{};
  s.group = p.num_heads / p.num_kv_heads;
  s.head_tiles = (s.group + rows - 1) / rows;
  s.heads_per_tile = (s.group + s.head_tiles - 1) / s.head_tiles;
  s.tokens_per_tile = rows / s.heads_per_tile;
  s.heads_x = p.num_kv_heads * s.head_tiles;
  s.total_tiles = p.num_tokens / s.tokens_per_tile + p.num_seqs;
  s.div_hp = FastDiv(s.heads_per_tile);
  s.div_tokens = FastDiv(s.tokens_per_tile);
  s.div_block = FastDiv(p.block_size);
  if (p.soft_cap > 0.0f) {
    s.score_scale = p.scale / p.soft_cap;
    s.cap_scale = p.soft_cap * kLog2e;
  } else {
    s.score_scale = p.scale * kLog2e;
    s.cap_scale = 0.0f;
  }
  return s;
}

// Blocks of the launch: total_tiles * heads_x (checked against the grid limit by the caller).
inline int64_t sched_blocks(const PrefillSched& s) {
  return int64_t(s.total_tiles) * s.heads_x;
}

// What one CTA computes.
struct TileWork {
  int seq;
  int kv_head;
  int head0;   // first query head of the tile
  int nh;      // real heads in the tile (<= heads_per_tile)
  int q_row0;  // query/out row of the tile's first token
  int tv;      // real tokens in the tile (<= tokens_per_tile)
  int pos0;    // cache position of the first token; token i sits at pos0 + i
};

// The sequence owning tile index `tile`: the last s with qsl[s] / T + s <= tile. A 32-way search
// by one warp (every warp of the CTA runs it; the loads hit the same lines): two rounds cover
// 1024 sequences.
__device__ __forceinline__ int find_sequence(const int32_t* qsl, int num_seqs, int tile,
                                             const FastDiv& div_tokens) {
  const int lane = threadIdx.x & 31;
  int lo = 0;
  int n = num_seqs;  // the answer lies in [lo, lo + n); tile start of lo <= tile always
  while (n > 1) {
    const int step = (n + 31) / 32;
    const int idx = lo + lane * step;
    const bool ok = lane * step < n && div_tokens.div(__ldg(qsl + idx)) + idx <= tile;
    const unsigned ballot = __ballot_sync(0xffffffffu, ok);
    const int k = 31 - __clz(ballot);  // lane 0 probes lo, so the ballot is never empty
    lo += k * step;
    n = min(step, n - k * step);
  }
  return lo;
}

// Fills `w` for this CTA; false when the CTA has nothing to do (uniform over the CTA).
__device__ __forceinline__ bool locate_tile(const PagedAttentionCudaParams& p,
                                            const PrefillSched& s, TileWork& w) {
  const int hx = static_cast<int>(blockIdx.x % static_cast<unsigned>(s.heads_x));
  const int tile =
      s.total_tiles - 1 - static_cast<int>(blockIdx.x / static_cast<unsigned>(s.heads_x));
  const int seq = find_sequence(p.query_start_loc, p.num_seqs, tile, s.div_tokens);
  const int q_begin = __ldg(p.query_start_loc + seq);
  const int q_len = __ldg(p.query_start_loc + seq + 1) - q_begin;
  const int t0 = (tile - (s.div_tokens.div(q_begin) + seq)) * s.tokens_per_tile;
  const int seq_len = __ldg(p.seq_lens + seq);
  // q_len > seq_len is rejected by the entry when it checks index values; without the checks
  // the tile is skipped rather than read through block-table entries that do not exist.
  if (t0 >= q_len || q_len > seq_len) return false;
  const int head_tile = hx % s.head_tiles;
  w.seq = seq;
  w.kv_head = hx / s.head_tiles;
  w.nh = min(s.heads_per_tile, s.group - head_tile * s.heads_per_tile);
  if (w.nh <= 0) return false;
  w.head0 = w.kv_head * s.group + head_tile * s.heads_per_tile;
  w.q_row0 = q_begin + t0;
  w.tv = min(s.tokens_per_tile, q_len - t0);
  w.pos0 = seq_len - q_len + t0;
  return true;
}

}  // namespace sagellm::cuda::prefill
