// Paged attention decode on CUDA: one new query token per sequence against its paged K/V.
//
// Layout: key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_size] ("NHD"): the
// row of one token and KV head is head_size contiguous elements (256 B at d = 128 in bf16).
//
// Grid (num_seqs * num_kv_heads * head_tiles, num_parts), 128 threads = 4 warps. A CTA owns one
// KV head of one sequence, the query heads of its GQA group (up to 8 per CTA; larger groups take
// several head tiles) and one partition of the keys, so each K/V row is read from HBM once. The
// KV heads of a sequence are adjacent in launch order, so CTAs running together read whole token
// rows of the cache (all KV heads of a token are one contiguous run).
// Bound: memory. Bytes per call = 2 * (visible keys) * num_kv_heads * head_size * elem_size,
// plus queries and outputs (noise); the FLOPs (4 per query head per K/V element) are far below
// what the tensor cores sustain, so the kernel is built to keep HBM busy:
//   * warps take the partition's 16-key tiles in turn; each warp streams its tiles through a
//     private 2-3 stage cp.async ring in shared memory (16-byte copies, 16 per lane per tile
//     at d = 128, zero-filled outside the visible keys), so at d = 128 two tiles (17 KB) per
//     warp are in flight while it uses a third; no CTA-wide barrier in the main loop;
//   * the block table is read once per tile (one broadcast load, prefetched a tile ahead) when
//     block_size is a multiple of 16, so a tile never straddles two blocks; other block sizes
//     look the block up per row (correct, slower);
//   * fp16 / bf16: tensor cores, mma.m16n8k16 with fp32 accumulators. S^T = K Q^T with the 16
//     keys as M and the (<= 8) heads as N; online softmax in fp32 with exp2 of log2e-scaled
//     scores; P^T is transposed in registers (movmatrix) into the B operand of O^T += V^T P^T.
//   * fp32: CUDA cores, lanes across head_size, fp32 throughout (tensor cores would lose the
//     accuracy that fp32 callers ask for).
// The 4 warps merge their (max, sum, acc) through shared memory at the end.
//
// Split-KV (flash-decoding): when the (sequence, KV head, head tile) CTAs alone would fill less
// than ~1.5 waves of the GPU, the keys are cut into partitions planned on the host from
// max_blocks_per_seq (never from device values, so the launch is legal in CUDA-graph capture).
// Each partition writes an unnormalised partial result (acc[d], max, sum) to the workspace and a
// reduce kernel merges them; partitions past a sequence's end exit at once, and a sequence with
// a single real partition writes `out` directly.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention/cuda/attention_cuda.cuh"

namespace sagellm::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 16;                 // keys per warp step: the MMA's M
constexpr int kCtaKeys = kWarps * kTileKeys;  // partitions are multiples of this
constexpr int kMaxRows = 8;                   // query heads per CTA: the MMA's N
constexpr int64_t kMinPartKeys = 256;         // shorter partitions cost more in partials than
constexpr int64_t kMaxPartKeys = 2048;        //   they gain; longer ones leave SMs idle
constexpr int64_t kMaxContext = int64_t{1} << 30;  // keeps every key index math in int32
constexpr int kMaxGridYZ = 65535;
constexpr int kReduceThreads = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- host-side plan ---------------------------------------------------------------------------

struct DecodePlan {
  int group;       // query heads per KV head
  int head_tiles;  // CTAs per KV head along its group
  int part_keys;   // keys per partition, a multiple of kCtaKeys
  int num_parts;   // grid z
  int max_ctx;     // max_blocks_per_seq * block_size (clamped)
  int stages;      // cp.async ring depth per warp (fp16 / bf16)
  size_t smem;     // dynamic shared memory per CTA
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Shared memory of the tensor-core kernel: per warp, `stages` K and V tiles of 16 rows, each row
// padded by 16 bytes so the 8 rows an ldmatrix reads fall in 8 different bank groups (the row
// length in 16-byte units is odd for every supported head size).
constexpr int padded_row(int head_size) { return head_size + 8; }
size_t mma_smem(int head_size, int stages) {
  return size_t{kWarps} * stages * 2 * kTileKeys * padded_row(head_size) * 2;
}
// The end-of-CTA merge buffer: [kWarps][kMaxRows][head_size] floats.
size_t merge_smem(int head_size) { return size_t{kWarps} * kMaxRows * head_size * 4; }

// SAGELLM_DECODE_STAGES=2 or 3 forces the ring depth, to compare both on a new GPU without a
// rebuild (two stages use less shared memory, so three CTAs fit an H100/H200 SM instead of two).
int stages_from_env() {
  static const int stages = [] {
    const char* v = std::getenv("SAGELLM_DECODE_STAGES");
    const int n = v == nullptr ? 0 : std::atoi(v);
    return n == 2 || n == 3 ? n : 0;
  }();
  return stages;
}

DecodePlan plan_decode(const PagedAttentionCudaParams& p) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  DecodePlan pl{};
  pl.group = p.num_heads / p.num_kv_heads;
  pl.head_tiles = static_cast<int>(ceil_div(pl.group, kMaxRows));
  pl.max_ctx = static_cast<int>(
      std::min<int64_t>(int64_t{p.max_blocks_per_seq} * p.block_size, kMaxContext));

  if (p.dtype == AttnDType::kF32) {
    pl.stages = 0;
    pl.smem = merge_smem(p.head_size);
  } else {
    // Three stages up to d = 128 (two 104 KB CTAs per H100/H200 SM at d = 128); two (one tile
    // in flight while the other is used) at d = 256 or where a block may not have that much.
    const size_t limit = prop->sharedMemPerBlockOptin;
    pl.stages = p.head_size <= 128 && mma_smem(p.head_size, 3) <= limit ? 3 : 2;
    if (stages_from_env() != 0) pl.stages = stages_from_env();
    pl.smem = mma_smem(p.head_size, pl.stages);
    TORCH_CHECK(pl.smem <= limit, "paged_attention_decode: head_size ", p.head_size, " needs ",
                pl.smem, " bytes of shared memory per block; this GPU allows ", limit);
  }

  // Keys a CTA may have to cover: the whole context, or the window plus the slack of starting
  // at a 16-aligned key.
  const int64_t span = std::max<int64_t>(
      1, std::min<int64_t>(pl.max_ctx, int64_t{p.sliding_window} + kTileKeys - 1));
  int64_t part = round_up(span, kCtaKeys);
  const int64_t ctas = int64_t{p.num_seqs} * p.num_kv_heads * pl.head_tiles;
  const int64_t per_sm = std::clamp<int64_t>(
      prop->sharedMemPerMultiprocessor / (pl.smem + prop->reservedSharedMemPerBlock), 1, 4);
  const int64_t resident = per_sm * prop->multiProcessorCount;
  if (span > kMinPartKeys && 2 * ctas < 3 * resident) {
    // About four waves of partitions: enough that the last, partial wave is a small fraction.
    const int64_t want = ceil_div(4 * resident, ctas);
    part = std::clamp(round_up(ceil_div(span, want), kCtaKeys), kMinPartKeys, kMaxPartKeys);
    part = std::min(part, round_up(span, kCtaKeys));
  }
  part = std::max(part, round_up(ceil_div(span, kMaxGridYZ), kCtaKeys));
  pl.part_keys = static_cast<int>(part);
  pl.num_parts = static_cast<int>(ceil_div(span, part));
  return pl;
}

int64_t workspace_floats(const PagedAttentionCudaParams& p, const DecodePlan& pl) {
  if (pl.num_parts <= 1) return 0;
  return int64_t{p.num_seqs} * p.num_heads * pl.num_parts * (p.head_size + 2);
}

// ---- device helpers ---------------------------------------------------------------------------

// Everything a CTA needs, passed by value (kernel parameter space).
struct DecodeArgs {
  PagedAttentionCudaParams p;
  int group;
  int head_tiles;
  int part_keys;
  int num_parts;
  int max_ctx;
  int stages;
  float score_scale;  // no soft cap: scale * log2e; soft cap: scale / soft_cap
  float cap_log2;     // soft_cap * log2e; 0 when off
};

// The visible keys [lo, len) of a sequence and how many partitions they fill. Partitions start
// at base = lo rounded down to 16, so every 16-key tile lies inside one partition and, when
// block_size % 16 == 0, inside one cache block.
struct SeqSpan {
  int len;
  int lo;
  int base;
  int parts;
};

__device__ __forceinline__ SeqSpan seq_span(const DecodeArgs& a, int seq) {
  SeqSpan s;
  // The host check (when on) guarantees len <= max_ctx; the clamp keeps unchecked input inside
  // the block table.
  s.len = min(__ldg(a.p.seq_lens + seq), a.max_ctx);
  s.lo = s.len > a.p.sliding_window ? s.len - a.p.sliding_window : 0;
  s.base = s.lo & ~(kTileKeys - 1);
  s.parts = s.len > s.base ? (s.len - s.base + a.part_keys - 1) / a.part_keys : 0;
  return s;
}

struct CtaCoords {
  int seq;
  int kv_head;
  int head_tile;
  int part;
};

__device__ __forceinline__ CtaCoords cta_coords(const DecodeArgs& a) {
  const int per_seq = a.p.num_kv_heads * a.head_tiles;
  CtaCoords c;
  c.seq = blockIdx.x / per_seq;
  const int rest = blockIdx.x - c.seq * per_seq;
  c.kv_head = rest / a.head_tiles;
  c.head_tile = rest - c.kv_head * a.head_tiles;
  c.part = blockIdx.y;
  return c;
}

__device__ __forceinline__ float score_of(const DecodeArgs& a, float dot) {
  return a.cap_log2 > 0.f ? a.cap_log2 * tanhf(dot * a.score_scale) : dot * a.score_scale;
}

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t bits(__nv_bfloat16 v) {
    return __bfloat16_as_ushort(v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t bits(__half v) { return __half_as_ushort(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Elem<float> {
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1 (each byte is used once); zero-filled when !valid.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
// Transposes an 8x8 matrix of 16-bit values held one row pair per lane (ldmatrix layout).
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ int64_t part_row(const DecodeArgs& a, int seq, int head, int part) {
  return (int64_t{seq} * a.p.num_heads + head) * a.num_parts + part;
}

// The end of every decode CTA: merges the warps' (max, sum, acc) rows in shared memory and
// writes either `out` (the sequence's only partition) or one partial slot of the workspace.
// wo: [kWarps][kMaxRows][D] accumulators; wm, wl: per warp and row running max and sum.
template <typename T, int D>
__device__ void finish_partition(const float* wo, const float (*wm)[kMaxRows],
                                 const float (*wl)[kMaxRows], int rows, const DecodeArgs& a,
                                 int seq, int head0, int part, bool direct) {
  __shared__ float weight[kWarps][kMaxRows];
  __shared__ float row_ml[kMaxRows][2];
  if (threadIdx.x < rows) {
    const int r = threadIdx.x;
    float m = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, wm[w][r]);
    const float mu = m == kNegInf ? 0.f : m;
    float e[kWarps];
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      e[w] = exp2f(wm[w][r] - mu);
      l += wl[w][r] * e[w];
    }
    const float norm = direct ? (l > 0.f ? 1.f / l : 0.f) : 1.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) weight[w][r] = e[w] * norm;
    row_ml[r][0] = m;
    row_ml[r][1] = l;
  }
  __syncthreads();
  const PagedAttentionCudaParams& p = a.p;
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D;
    const int d = idx - r * D;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += wo[(w * kMaxRows + r) * D + d] * weight[w][r];
    if (direct) {
      T* out = static_cast<T*>(p.out) + int64_t{seq} * p.out_stride_token +
               int64_t{head0 + r} * p.out_stride_head;
      out[d] = Elem<T>::from_float(v);
    } else {
      p.workspace[part_row(a, seq, head0 + r, part) * D + d] = v;
    }
  }
  if (!direct && threadIdx.x < rows) {
    const int r = threadIdx.x;
    const int64_t total = int64_t{p.num_seqs} * p.num_heads * a.num_parts;
    float* ml = p.workspace + total * D + part_row(a, seq, head0 + r, part) * 2;
    ml[0] = row_ml[r][0];
    ml[1] = row_ml[r][1];
  }
}

// ---- fp16 / bf16: tensor cores ----------------------------------------------------------------

template <typename T, int D, bool kAligned>
__global__ void __launch_bounds__(kThreads) decode_mma_kernel(const DecodeArgs a) {
  constexpr int KS = D / 16;                 // 16-wide k-steps of QK, 16-row m-tiles of PV
  constexpr int kRow = padded_row(D);        // smem row, elements
  constexpr int kTile = kTileKeys * kRow;    // one K or V tile, elements
  constexpr int kChunks = D / 8;             // 16-byte chunks per row
  constexpr int kPerLane = kTileKeys * kChunks / 32;
  static_assert(D % 16 == 0 && (kTileKeys * kChunks) % 32 == 0, "unsupported head size");

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float warp_m[kWarps][kMaxRows];
  __shared__ float warp_l[kWarps][kMaxRows];

  const PagedAttentionCudaParams& p = a.p;
  const CtaCoords at = cta_coords(a);
  const int seq = at.seq;
  const int kv_head = at.kv_head;
  const int head_tile = at.head_tile;
  const int part = at.part;
  const SeqSpan span = seq_span(a, seq);
  const int key_begin = span.base + part * a.part_keys;
  if (key_begin >= span.len) return;  // past the end of this sequence: nothing to do
  const int key_end = min(key_begin + a.part_keys, span.len);
  const int g0 = a.group * head_tile / a.head_tiles;
  const int rows = a.group * (head_tile + 1) / a.head_tiles - g0;
  const int head0 = kv_head * a.group + g0;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // MMA fragment row group
  const int t = lane % 4;  // MMA fragment column pair

  // Q^T as the B operand of S^T = K Q^T: column n = head g, rows (dims) 2t, 2t+1 (+8). Heads
  // past `rows` are zero and their scores are never written out.
  uint32_t qf[KS][2];
  {
    const T* q = static_cast<const T*>(p.query) + int64_t{seq} * p.q_stride_token +
                 int64_t{head0 + g} * p.q_stride_head;
    const bool real = g < rows;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int d = ks * 16 + 2 * t;
      qf[ks][0] = real ? Elem<T>::bits(q[d]) | Elem<T>::bits(q[d + 1]) << 16 : 0u;
      qf[ks][1] = real ? Elem<T>::bits(q[d + 8]) | Elem<T>::bits(q[d + 9]) << 16 : 0u;
    }
  }

  T* ring = reinterpret_cast<T*>(smem) + warp * a.stages * 2 * kTile;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const int64_t token_stride = int64_t{p.num_kv_heads} * D;
  const int64_t head_off = int64_t{kv_head} * D;
  const int32_t* table = p.block_tables + int64_t{seq} * p.block_tables_stride;
  const int bs = p.block_size;

  const int ntiles = (key_end - key_begin + kTileKeys - 1) / kTileKeys;
  const int my_tiles = warp < ntiles ? (ntiles - warp + kWarps - 1) / kWarps : 0;
  auto tile_key = [&](int n) { return key_begin + kTileKeys * (warp + kWarps * n); };
  // Aligned blocks: the block of a whole tile, one broadcast load.
  auto tile_block = [&](int n) {
    return kAligned && n < my_tiles ? __ldg(table + tile_key(n) / bs) : 0;
  };
  auto load_tile = [&](int n, int stage, int block) {
    T* ks = ring + stage * 2 * kTile;
    T* vs = ks + kTile;
    const int key0 = tile_key(n);
    const int64_t row0 = (int64_t{block} * bs + key0 % bs) * token_stride + head_off;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = i * 32 + lane;
      const int r = c / kChunks;
      const int col = c % kChunks;
      const int key = key0 + r;
      const bool valid = key >= span.lo && key < key_end;
      int64_t off = 0;
      if (valid) {
        if constexpr (kAligned) {
          off = row0 + r * token_stride + col * 8;
        } else {
          const int b = key / bs;
          off = (int64_t{__ldg(table + b)} * bs + (key - b * bs)) * token_stride + head_off +
                col * 8;
        }
      }
      cp_async_16(ks + r * kRow + col * 8, kc + off, valid);
      cp_async_16(vs + r * kRow + col * 8, vc + off, valid);
    }
  };

  float o[KS][4];  // O^T fragments: m-tile = 16 dims, columns = heads 2t, 2t+1
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
  float m0 = kNegInf, m1 = kNegInf;  // running max of heads 2t, 2t+1 (log2 domain)
  float l0 = 0.f, l1 = 0.f;          // this lane's share of their running sums

  auto compute_tile = [&](int n, int stage) {
    const T* ks = ring + stage * 2 * kTile;
    const T* vs = ks + kTile;
    // Two accumulator chains halve the dependent-MMA latency.
    float sa[4] = {0.f, 0.f, 0.f, 0.f};
    float sb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks_i = 0; ks_i < KS; ++ks_i) {
      uint32_t kf[4];
      ldmatrix_x4(kf, ks + (lane % 16) * kRow + ks_i * 16 + (lane / 16) * 8);
      if (ks_i % 2 == 0)
        Elem<T>::mma(sa, kf, qf[ks_i][0], qf[ks_i][1]);
      else
        Elem<T>::mma(sb, kf, qf[ks_i][0], qf[ks_i][1]);
    }
    // s[0], s[1]: key g, heads 2t, 2t+1; s[2], s[3]: key g + 8.
    const int key_a = tile_key(n) + g;
    const int key_b = key_a + 8;
    const bool va = key_a >= span.lo && key_a < key_end;
    const bool vb = key_b >= span.lo && key_b < key_end;
    float s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] = score_of(a, sa[i] + sb[i]);
    if (!va) s[0] = s[1] = kNegInf;
    if (!vb) s[2] = s[3] = kNegInf;

    float mx0 = fmaxf(s[0], s[2]);
    float mx1 = fmaxf(s[1], s[3]);
#pragma unroll
    for (int off = 4; off < 32; off *= 2) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0);
    const float mn1 = fmaxf(m1, mx1);
    // Nothing visible yet: keep everything at zero instead of exp2(-inf - -inf) = NaN.
    const float mu0 = mn0 == kNegInf ? 0.f : mn0;
    const float mu1 = mn1 == kNegInf ? 0.f : mn1;
    const float alpha0 = exp2f(m0 - mu0);
    const float alpha1 = exp2f(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    const float p0 = exp2f(s[0] - mu0);
    const float p1 = exp2f(s[1] - mu1);
    const float p2 = exp2f(s[2] - mu0);
    const float p3 = exp2f(s[3] - mu1);
    l0 = l0 * alpha0 + p0 + p2;
    l1 = l1 * alpha1 + p1 + p3;
    // P^T[key][head] in the ldmatrix layout, transposed into the B operand (k = key, n = head).
    const uint32_t pb0 = transpose_8x8(Elem<T>::pack(p0, p1));
    const uint32_t pb1 = transpose_8x8(Elem<T>::pack(p2, p3));
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) {
      o[mt][0] *= alpha0;
      o[mt][1] *= alpha1;
      o[mt][2] *= alpha0;
      o[mt][3] *= alpha1;
      uint32_t vf[4];
      ldmatrix_x4_trans(vf, vs + ((lane % 8) + (lane / 16) * 8) * kRow + mt * 16 +
                                ((lane / 8) % 2) * 8);
      Elem<T>::mma(o[mt], vf, pb0, pb1);
    }
  };

  // The ring: tile n lives in stage n % stages; `stages - 1` tiles are in flight while one is
  // used. One commit group per tile (empty past the end) keeps wait_group's count exact.
  const int stages = a.stages;
  int block = tile_block(0);
  for (int n = 0; n < stages - 1; ++n) {
    const int next = tile_block(n + 1);
    if (n < my_tiles) load_tile(n, n, block);
    cp_async_commit();
    block = next;
  }
  for (int n = 0; n < my_tiles; ++n) {
    const int fill = n + stages - 1;
    const int next = tile_block(fill + 1);
    if (fill < my_tiles) load_tile(fill, fill % stages, block);
    cp_async_commit();
    block = next;
    if (stages == 3)
      cp_async_wait<2>();
    else
      cp_async_wait<1>();
    __syncwarp();  // every lane's copies of tile n have landed
    compute_tile(n, n % stages);
    __syncwarp();  // every lane is done reading the stage the next fill overwrites
  }
  cp_async_wait<0>();

#pragma unroll
  for (int off = 4; off < 32; off *= 2) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  __syncthreads();  // all rings drained: the merge buffer reuses their shared memory
  float* wo = reinterpret_cast<float*>(smem);
  float* mine = wo + warp * kMaxRows * D;
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) {
    const int d = mt * 16 + g;
    mine[(2 * t) * D + d] = o[mt][0];
    mine[(2 * t + 1) * D + d] = o[mt][1];
    mine[(2 * t) * D + d + 8] = o[mt][2];
    mine[(2 * t + 1) * D + d + 8] = o[mt][3];
  }
  if (g == 0) {
    warp_m[warp][2 * t] = m0;
    warp_m[warp][2 * t + 1] = m1;
    warp_l[warp][2 * t] = l0;
    warp_l[warp][2 * t + 1] = l1;
  }
  __syncthreads();
  finish_partition<T, D>(wo, warp_m, warp_l, rows, a, seq, head0, part, span.parts == 1);
}

// ---- fp32: CUDA cores -------------------------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads) decode_f32_kernel(const DecodeArgs a) {
  constexpr int NI = (D + 31) / 32;  // head_size elements per lane
  constexpr int KB = D > 128 ? 2 : 4;  // keys per warp step (loads in flight)

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float warp_m[kWarps][kMaxRows];
  __shared__ float warp_l[kWarps][kMaxRows];

  const PagedAttentionCudaParams& p = a.p;
  const CtaCoords at = cta_coords(a);
  const int seq = at.seq;
  const int kv_head = at.kv_head;
  const int head_tile = at.head_tile;
  const int part = at.part;
  const SeqSpan span = seq_span(a, seq);
  const int key_begin = span.base + part * a.part_keys;
  if (key_begin >= span.len) return;
  const int key_end = min(key_begin + a.part_keys, span.len);
  const int g0 = a.group * head_tile / a.head_tiles;
  const int rows = a.group * (head_tile + 1) / a.head_tiles - g0;
  const int head0 = kv_head * a.group + g0;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  float q[kMaxRows][NI];
  {
    const float* qp = static_cast<const float*>(p.query) + int64_t{seq} * p.q_stride_token +
                      int64_t{head0} * p.q_stride_head;
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r)
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int d = lane + 32 * i;
        q[r][i] = r < rows && d < D ? qp[r * p.q_stride_head + d] : 0.f;
      }
  }
  const float* kc = static_cast<const float*>(p.key_cache);
  const float* vc = static_cast<const float*>(p.value_cache);
  const int64_t token_stride = int64_t{p.num_kv_heads} * D;
  const int64_t head_off = int64_t{kv_head} * D;
  const int32_t* table = p.block_tables + int64_t{seq} * p.block_tables_stride;
  const int bs = p.block_size;

  float acc[kMaxRows][NI];
  float m[kMaxRows], l[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < NI; ++i) acc[r][i] = 0.f;
  }

  for (int k0 = key_begin + warp * KB; k0 < key_end; k0 += kWarps * KB) {
    int64_t row[KB];
    bool valid[KB];
#pragma unroll
    for (int v = 0; v < KB; ++v) {
      const int key = k0 + v;
      valid[v] = key >= span.lo && key < key_end;
      row[v] = 0;
      if (valid[v]) {
        const int b = key / bs;
        row[v] = (int64_t{__ldg(table + b)} * bs + (key - b * bs)) * token_stride + head_off;
      }
    }
    float kv[KB][NI];
#pragma unroll
    for (int v = 0; v < KB; ++v)
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int d = lane + 32 * i;
        kv[v][i] = valid[v] && d < D ? __ldg(kc + row[v] + d) : 0.f;
      }
    float pr[KB][kMaxRows];
    float alpha[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      alpha[r] = 1.f;
      if (r >= rows) continue;
      float mx = kNegInf;
#pragma unroll
      for (int v = 0; v < KB; ++v) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < NI; ++i) dot = fmaf(q[r][i], kv[v][i], dot);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        pr[v][r] = valid[v] ? score_of(a, dot) : kNegInf;
        mx = fmaxf(mx, pr[v][r]);
      }
      const float mn = fmaxf(m[r], mx);
      const float mu = mn == kNegInf ? 0.f : mn;
      alpha[r] = exp2f(m[r] - mu);
      m[r] = mn;
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < KB; ++v) {
        pr[v][r] = exp2f(pr[v][r] - mu);
        sum += pr[v][r];
      }
      l[r] = l[r] * alpha[r] + sum;
    }
    float vv[KB][NI];
#pragma unroll
    for (int v = 0; v < KB; ++v)
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int d = lane + 32 * i;
        vv[v][i] = valid[v] && d < D ? __ldg(vc + row[v] + d) : 0.f;
      }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= rows) continue;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        float x = acc[r][i] * alpha[r];
#pragma unroll
        for (int v = 0; v < KB; ++v) x = fmaf(pr[v][r], vv[v][i], x);
        acc[r][i] = x;
      }
    }
  }

  float* wo = reinterpret_cast<float*>(smem);
  float* mine = wo + warp * kMaxRows * D;
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r)
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int d = lane + 32 * i;
      if (d < D) mine[r * D + d] = acc[r][i];
    }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      warp_m[warp][r] = m[r];
      warp_l[warp][r] = l[r];
    }
  }
  __syncthreads();
  finish_partition<float, D>(wo, warp_m, warp_l, rows, a, seq, head0, part, span.parts == 1);
}

// ---- split-KV reduce --------------------------------------------------------------------------

// Grid (num_seqs, num_heads): merges the real partitions of sequences that have more than one.
template <typename T, int D>
__global__ void __launch_bounds__(kReduceThreads) decode_reduce_kernel(const DecodeArgs a) {
  constexpr int NI = (D + kReduceThreads - 1) / kReduceThreads;
  const PagedAttentionCudaParams& p = a.p;
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int parts = seq_span(a, seq).parts;
  if (parts <= 1) return;  // written directly by its only partition (or nothing visible)
  const int64_t first = part_row(a, seq, head, 0);
  const int64_t total = int64_t{p.num_seqs} * p.num_heads * a.num_parts;
  const float* acc = p.workspace + first * D;
  const float* ml = p.workspace + total * D + first * 2;

  float m = kNegInf;
  for (int i = 0; i < parts; ++i) m = fmaxf(m, ml[2 * i]);
  const float mu = m == kNegInf ? 0.f : m;
  float l = 0.f;
  float o[NI];
#pragma unroll
  for (int j = 0; j < NI; ++j) o[j] = 0.f;
  for (int i = 0; i < parts; ++i) {
    const float w = exp2f(ml[2 * i] - mu);
    l += ml[2 * i + 1] * w;
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      const int d = threadIdx.x + j * kReduceThreads;
      if (d < D) o[j] += w * acc[int64_t{i} * D + d];
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* out = static_cast<T*>(p.out) + int64_t{seq} * p.out_stride_token +
           int64_t{head} * p.out_stride_head;
#pragma unroll
  for (int j = 0; j < NI; ++j) {
    const int d = threadIdx.x + j * kReduceThreads;
    if (d < D) out[d] = Elem<T>::from_float(o[j] * inv);
  }
}

// ---- launch -----------------------------------------------------------------------------------

// Raises a kernel's dynamic shared-memory limit once per device (and size), so repeated launches,
// CUDA-graph capture included, make no further driver calls for it.
template <auto kKernel>
void allow_dynamic_smem(size_t bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<size_t> allowed[kMaxDevices];
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && allowed[device].load(std::memory_order_relaxed) >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (device < kMaxDevices) allowed[device].store(bytes, std::memory_order_relaxed);
}

// Instantiations: {bf16, fp16} x 5 head sizes x {aligned, any} block size for the tensor-core
// kernel, 5 head sizes for the fp32 kernel, 3 dtypes x 5 head sizes for the reduce.
template <typename T, int D>
void launch_for(const DecodeArgs& a, const DecodePlan& pl, cudaStream_t stream) {
  const dim3 grid(a.p.num_seqs * a.p.num_kv_heads * pl.head_tiles, pl.num_parts);
  if constexpr (std::is_same_v<T, float>) {
    decode_f32_kernel<D><<<grid, kThreads, pl.smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    if (a.p.block_size % kTileKeys == 0) {
      allow_dynamic_smem<decode_mma_kernel<T, D, true>>(pl.smem);
      decode_mma_kernel<T, D, true><<<grid, kThreads, pl.smem, stream>>>(a);
    } else {
      allow_dynamic_smem<decode_mma_kernel<T, D, false>>(pl.smem);
      decode_mma_kernel<T, D, false><<<grid, kThreads, pl.smem, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (pl.num_parts > 1) {
    decode_reduce_kernel<T, D>
        <<<dim3(a.p.num_seqs, a.p.num_heads), kReduceThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <int D>
void launch_head_size(const DecodeArgs& a, const DecodePlan& pl, cudaStream_t stream) {
  switch (a.p.dtype) {
    case AttnDType::kF32:
      return launch_for<float, D>(a, pl, stream);
    case AttnDType::kF16:
      return launch_for<__half, D>(a, pl, stream);
    case AttnDType::kBF16:
      return launch_for<__nv_bfloat16, D>(a, pl, stream);
  }
  TORCH_CHECK(false, "paged_attention_decode: unknown dtype ", static_cast<int>(a.p.dtype));
}

}  // namespace

int64_t decode_workspace_floats(const PagedAttentionCudaParams& p) {
  if (p.num_seqs == 0) return 0;
  return workspace_floats(p, plan_decode(p));
}

void launch_paged_attention_decode(const PagedAttentionCudaParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return;
  TORCH_CHECK(p.max_blocks_per_seq >= 1 && p.block_size >= 1,
              "paged_attention_decode: the block table has no room for any key");
  TORCH_CHECK(p.num_kv_heads >= 1 && p.num_heads % p.num_kv_heads == 0 &&
                  p.num_heads <= kMaxGridYZ,
              "paged_attention_decode: unsupported head counts ", p.num_heads, " / ",
              p.num_kv_heads);
  const DecodePlan pl = plan_decode(p);
  TORCH_CHECK(int64_t{p.num_seqs} * p.num_kv_heads * pl.head_tiles <=
                  std::numeric_limits<int32_t>::max(),
              "paged_attention_decode: too many sequences x KV heads for one grid: ", p.num_seqs,
              " x ", p.num_kv_heads);
  const int64_t need = workspace_floats(p, pl);
  TORCH_CHECK(need == 0 || (p.workspace != nullptr && p.workspace_floats >= need),
              "paged_attention_decode: workspace of ", p.workspace_floats, " floats, need ",
              need);
  DecodeArgs a{};
  a.p = p;
  a.group = pl.group;
  a.head_tiles = pl.head_tiles;
  a.part_keys = pl.part_keys;
  a.num_parts = pl.num_parts;
  a.max_ctx = pl.max_ctx;
  a.stages = pl.stages;
  if (p.soft_cap > 0.f) {
    a.score_scale = p.scale / p.soft_cap;
    a.cap_log2 = p.soft_cap * kLog2e;
  } else {
    a.score_scale = p.scale * kLog2e;
    a.cap_log2 = 0.f;
  }
  switch (p.head_size) {
    case 64:
      return launch_head_size<64>(a, pl, stream);
    case 80:
      return launch_head_size<80>(a, pl, stream);
    case 96:
      return launch_head_size<96>(a, pl, stream);
    case 128:
      return launch_head_size<128>(a, pl, stream);
    case 256:
      return launch_head_size<256>(a, pl, stream);
  }
  TORCH_CHECK(false, "paged_attention_decode: head_size ", p.head_size, " has no CUDA kernel");
}

}  // namespace sagellm::cuda
