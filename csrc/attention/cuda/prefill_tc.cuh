// Paged prefill on tensor cores (bf16 / fp16, sm_80+): FlashAttention-2 style.
//
// A CTA of WARPS warps owns a tile of 16 * MI * WARPS query rows (tokens x heads of one KV
// head, see prefill_sched.cuh); warp w owns rows [16 MI w, 16 MI (w + 1)). The CTA walks the
// visible keys in tiles of BN, gathered from the paged cache into shared memory with 16-byte
// cp.async, two stages deep (tile j + 1 lands while tile j is computed). Per key tile a warp
// computes S = Q K^T with mma.m16n8k16 (Q fragments from shared memory, K fragments by
// ldmatrix), applies scale / soft cap / mask in registers, updates the online softmax
// (running max and sum per row, fp32), converts P to 16 bits in place (the accumulator layout
// of S is the A-fragment layout of P) and accumulates O += P V (V fragments by ldmatrix.trans).
// Masks are evaluated only on tiles that cross the causal diagonal or the window's edge.
//
// Shared memory rows are padded by 16 bytes (D + 8 elements), which puts the 8 rows an ldmatrix
// phase reads on 8 different 16-byte bank groups for every head size (64..256).
//
// Bound: compute. Per key tile and warp: 2 * 16 MI * BN * D multiply-adds on tensor cores
// against (16 MI + 2 BN) * D * 2 bytes read from shared memory; K/V traffic from memory is
// shared by the tile's rows (GQA heads included), so it is small beside the FLOPs at any
// prefill length worth a tensor core.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_cuda.cuh"
#include "attention/cuda/prefill_ptx.cuh"
#include "attention/cuda/prefill_sched.cuh"

namespace sagellm::cuda::prefill {

template <int D, int MI, int WARPS, int BN>
struct TcShape {
  static constexpr int kHeadSize = D;
  static constexpr int kThreads = 32 * WARPS;
  static constexpr int kRows = 16 * MI * WARPS;
  static constexpr int kKeys = BN;
  static constexpr int kLds = D + 8;     // shared row pitch in elements
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kSmemBytes = (kRows + 4 * BN) * kLds * 2;  // Q, K[2], V[2]
  static_assert(D % 16 == 0 && BN % 16 == 0, "mma tiles are 16 wide");
};

template <typename T, int D, int MI, int WARPS, int BN>
__global__ void __launch_bounds__(32 * WARPS)
    paged_prefill_tc_kernel(const PagedAttentionCudaParams p, const PrefillSched s) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using Shape = TcShape<D, MI, WARPS, BN>;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kRows = Shape::kRows;
  constexpr int kLds = Shape::kLds;
  constexpr int kChunks = Shape::kChunks;
  constexpr int kNB = BN / 8;  // 8-key column blocks of S
  constexpr int kDB = D / 8;   // 8-wide column blocks of O
  constexpr float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);
  T* const sK = sQ + kRows * kLds;  // [2][BN][kLds]
  T* const sV = sK + 2 * BN * kLds;

  TileWork w;
  if (!locate_tile(p, s, w)) return;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // Loads: thread tid moves 16-byte chunk tid % kChunks of rows tid / kChunks + i * kRowStep.
  constexpr int kRowStep = kThreads / kChunks;
  constexpr bool kAllLoad = kThreads % kChunks == 0;  // else the last few threads idle
  const int ld_row = tid / kChunks;
  const int ld_ch = tid % kChunks;
  const bool ld_active = kAllLoad || ld_row < kRowStep;
  const uint32_t ld_dst = (ld_row * kLds + ld_ch * 8) * 2;  // byte offset inside a tile

  // ---- Q tile: row r = token r / hp, head r % hp; rows past the real ones repeat the last
  // real token / head, so they compute finite values that are never stored.
  {
    const T* q = static_cast<const T*>(p.query) + ld_ch * 8;
    const uint32_t dst = smem_addr(sQ) + ld_dst;
#pragma unroll
    for (int i = 0; i < (kRows + kRowStep - 1) / kRowStep; ++i) {
      const int r = ld_row + i * kRowStep;
      if (ld_active && (kRows % kRowStep == 0 || r < kRows)) {
        const int tok = s.div_hp.div(r);
        const int hh = min(r - tok * s.heads_per_tile, w.nh - 1);
        const T* src = q + int64_t(w.q_row0 + min(tok, w.tv - 1)) * p.q_stride_token +
                       int64_t(w.head0 + hh) * p.q_stride_head;
        cp_async16(dst + i * kRowStep * kLds * 2, src, true);
      }
    }
  }

  // ---- key range: [n_begin, key_end) in tiles of BN, n_begin aligned to BN.
  const int window = p.sliding_window;
  const int pos_last = w.pos0 + w.tv - 1;
  const int key_end = pos_last + 1;
  const int key_lo = max(0, w.pos0 - window + 1);
  const int n_begin = key_lo / BN * BN;
  const int num_tiles = (key_end - n_begin + BN - 1) / BN;
  const int window_lo_max = pos_last - window + 1;  // keys below it are hidden from some row

  const int64_t token_pitch = int64_t(p.num_kv_heads) * D;
  const int64_t head_off = int64_t(w.kv_head) * D;
  const int32_t* const table = p.block_tables + int64_t(w.seq) * p.block_tables_stride;
  const int block_size = p.block_size;

  // Gathers key tile `tile` into stage `stage`. Keys past key_end are zero-filled, never read
  // (their block ids may be garbage), so P = 0 never meets a NaN in V; the block id is read at
  // the clamped key, which keeps the loop free of branches.
  const T* const kc_lane = static_cast<const T*>(p.key_cache) + ld_ch * 8;
  const T* const vc_lane = static_cast<const T*>(p.value_cache) + ld_ch * 8;
  const uint32_t k_dst = smem_addr(sK) + ld_dst;
  const uint32_t v_dst = smem_addr(sV) + ld_dst;
  auto load_kv = [&](int tile, int stage) {
    const int n0 = n_begin + tile * BN;
#pragma unroll
    for (int i = 0; i < (BN + kRowStep - 1) / kRowStep; ++i) {
      const int r = ld_row + i * kRowStep;
      if (ld_active && (BN % kRowStep == 0 || r < BN)) {
        const int key = min(n0 + r, key_end - 1);
        const int blk = s.div_block.div(key);
        const int64_t off =
            (int64_t(__ldg(table + blk)) * block_size + (key - blk * block_size)) * token_pitch +
            head_off;
        const uint32_t dst = (stage * BN + i * kRowStep) * kLds * 2;
        cp_async16(k_dst + dst, kc_lane + off, n0 + r < key_end);
        cp_async16(v_dst + dst, vc_lane + off, n0 + r < key_end);
      }
    }
  };

  load_kv(0, 0);
  cp_async_commit();  // group 0: Q and key tile 0
  if (num_tiles > 1) {
    load_kv(1, 1);
    cp_async_commit();
  }

  // ---- per-thread row state: rows g and g + 8 of each of the warp's MI 16-row blocks.
  const int g = lane >> 2;
  const int t4 = lane & 3;
  int row_pos[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 * MI + mi * 16 + g + 8 * h;
      row_pos[mi][h] = w.pos0 + min(s.div_hp.div(r), w.tv - 1);
    }
  float o[MI][kDB][4];
  float m_run[MI][2];
  float l_run[MI][2];  // this thread's share of the row sum; the quad is summed at the end
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int j = 0; j < kDB; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][j][e] = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m_run[mi][h] = kNegInf;
      l_run[mi][h] = 0.0f;
    }
  }

  // ldmatrix lane addresses (bytes), tile offsets are added as constants.
  const uint32_t q_base =
      smem_addr(sQ) + ((warp * 16 * MI + (lane & 15)) * kLds + (lane >> 4) * 8) * 2;
  const uint32_t k_lane = ((((lane >> 4) << 3) + (lane & 7)) * kLds + ((lane >> 3) & 1) * 8) * 2;
  const uint32_t v_lane = ((((lane >> 3) & 1) * 8 + (lane & 7)) * kLds + (lane >> 4) * 8) * 2;
  const uint32_t k_smem = smem_addr(sK);
  const uint32_t v_smem = smem_addr(sV);
  const bool soft_cap = s.cap_scale != 0.0f;

  for (int j = 0; j < num_tiles; ++j) {
    const int stage = j & 1;
    const int n0 = n_begin + j * BN;
    if (j + 1 < num_tiles) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // ---- S = Q K^T
    float sc[MI][kNB][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[mi][nb][e] = 0.0f;
    const uint32_t k_base = k_smem + stage * BN * kLds * 2 + k_lane;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(a[mi], q_base + (mi * 16 * kLds + kk * 16) * 2);
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, k_base + (nn * 16 * kLds + kk * 16) * 2);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          Mma<T>::run(sc[mi][2 * nn], a[mi], b[0], b[1]);
          Mma<T>::run(sc[mi][2 * nn + 1], a[mi], b[2], b[3]);
        }
      }
    }

    // ---- scale (to log2 units), soft cap, mask
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = sc[mi][nb][e] * s.score_scale;
          if (soft_cap) x = fast_tanh(x) * s.cap_scale;
          sc[mi][nb][e] = x;
        }
    const bool need_mask = n0 + BN - 1 > w.pos0 || n0 < window_lo_max;
    if (need_mask) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = n0 + nb * 8 + 2 * t4 + (e & 1);
            const int pos = row_pos[mi][e >> 1];
            if (key > pos || key <= pos - window) sc[mi][nb][e] = kNegInf;
          }
    }

    // ---- online softmax; a row with nothing visible yet keeps max -inf and adds zeros.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = kNegInf;
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb)
          mx = fmaxf(mx, fmaxf(sc[mi][nb][2 * h], sc[mi][nb][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[mi][h], mx);
        const float m_use = m_new == kNegInf ? 0.0f : m_new;
        const float alpha = fast_exp2(m_run[mi][h] - m_use);
        m_run[mi][h] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            const float pe = fast_exp2(sc[mi][nb][e] - m_use);
            sc[mi][nb][e] = pe;
            sum += pe;
          }
        l_run[mi][h] = l_run[mi][h] * alpha + sum;
#pragma unroll
        for (int db = 0; db < kDB; ++db) {
          o[mi][db][2 * h] *= alpha;
          o[mi][db][2 * h + 1] *= alpha;
        }
      }

    // ---- O += P V
    const uint32_t v_base = v_smem + stage * BN * kLds * 2 + v_lane;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        pa[mi][0] = Mma<T>::pack(sc[mi][2 * kk][0], sc[mi][2 * kk][1]);
        pa[mi][1] = Mma<T>::pack(sc[mi][2 * kk][2], sc[mi][2 * kk][3]);
        pa[mi][2] = Mma<T>::pack(sc[mi][2 * kk + 1][0], sc[mi][2 * kk + 1][1]);
        pa[mi][3] = Mma<T>::pack(sc[mi][2 * kk + 1][2], sc[mi][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_base + (kk * 16 * kLds + dd * 16) * 2);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          Mma<T>::run(o[mi][2 * dd], pa[mi], b[0], b[1]);
          Mma<T>::run(o[mi][2 * dd + 1], pa[mi], b[2], b[3]);
        }
      }
    }

    __syncthreads();  // every warp is done with this stage before it is refilled
    if (j + 2 < num_tiles) {
      load_kv(j + 2, stage);
      cp_async_commit();
    }
  }

  // ---- epilogue: normalise, stage the warp's rows in its own (now unused) Q rows, store 16 B.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mi][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = 1.0f / l;  // every row sees at least its own key: l > 0
      const int r = warp * 16 * MI + mi * 16 + g + 8 * h;
#pragma unroll
      for (int db = 0; db < kDB; ++db)
        *reinterpret_cast<uint32_t*>(sQ + r * kLds + db * 8 + 2 * t4) =
            Mma<T>::pack(o[mi][db][2 * h] * inv, o[mi][db][2 * h + 1] * inv);
    }
  __syncwarp();
  T* const out = static_cast<T*>(p.out);
#pragma unroll
  for (int c = lane; c < 16 * MI * kChunks; c += 32) {
    const int r = warp * 16 * MI + c / kChunks;
    const int ch = c % kChunks;
    const int tok = s.div_hp.div(r);
    const int hh = r - tok * s.heads_per_tile;
    if (tok < w.tv && hh < w.nh) {
      T* dst = out + int64_t(w.q_row0 + tok) * p.out_stride_token +
               int64_t(w.head0 + hh) * p.out_stride_head + ch * 8;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sQ + r * kLds + ch * 8);
    }
  }
#else
  __trap();  // launched only on sm_80+ (the launcher checks the device)
#endif
}

}  // namespace sagellm::cuda::prefill
