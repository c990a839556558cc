// Paged prefill without tensor cores: the fp32 path, and the fallback for 16-bit inputs whose
// pointers or strides are not 16-byte aligned (it loads element by element).
//
// A CTA of 4 warps owns a tile of 32 query rows (tokens x heads of one KV head, see
// prefill_sched.cuh), 8 per warp, and walks the visible keys in tiles of 32 staged in shared
// memory as fp32. For scores, lane k of a warp owns key k of the tile (its K row is read with
// a pitch of D + 1 floats: no bank conflicts) and the query rows are broadcast; for O += P V,
// lane d owns output columns d, d + 32, ... . Online softmax in fp32 with ex2 (~2^-22 relative
// error) and tanhf, since the fp32 results are compared with an fp64 reference at 1e-5.
//
// Bound: FMA throughput and shared-memory loads (no reuse beyond the 8 rows a warp holds);
// roughly an order of magnitude below the tensor-core path, and meant for fp32 only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/attention_cuda.cuh"
#include "attention/cuda/prefill_sched.cuh"

namespace sagellm::cuda::prefill {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

struct SimtShape {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = 4;
  static constexpr int kRows = 32;
  static constexpr int kRowsPerWarp = 8;
  static constexpr int kKeys = 32;
  template <int D>
  static constexpr int smem_bytes() {
    // q [kRows][D], k [kKeys][D + 1], v [kKeys][D], p [kWarps][8][kKeys] floats,
    // then the tile's cache row offsets (int64, -1 when past the end).
    return (kRows * D + kKeys * (D + 1) + kKeys * D + kWarps * kRowsPerWarp * kKeys) * 4 +
           kKeys * 8;
  }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int D>
__global__ void __launch_bounds__(SimtShape::kThreads)
    paged_prefill_simt_kernel(const PagedAttentionCudaParams p, const PrefillSched s) {
  constexpr int kThreads = SimtShape::kThreads;
  constexpr int kRows = SimtShape::kRows;
  constexpr int kRPW = SimtShape::kRowsPerWarp;
  constexpr int kKeys = SimtShape::kKeys;
  constexpr int kCols = (D + 31) / 32;  // output columns per lane
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* const sq = reinterpret_cast<float*>(smem_raw);  // [kRows][D]
  float* const sk = sq + kRows * D;                       // [kKeys][D + 1]
  float* const sv = sk + kKeys * (D + 1);                 // [kKeys][D]
  float* const sp = sv + kKeys * D;                       // [kWarps][kRPW][kKeys]
  int64_t* const soff = reinterpret_cast<int64_t*>(sp + SimtShape::kWarps * kRPW * kKeys);

  TileWork w;
  if (!locate_tile(p, s, w)) return;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  const T* const q = static_cast<const T*>(p.query);
  for (int c = tid; c < kRows * D; c += kThreads) {
    const int r = c / D;
    const int d = c % D;
    const int tok = s.div_hp.div(r);
    const int hh = min(r - tok * s.heads_per_tile, w.nh - 1);
    sq[c] = to_float(q[int64_t(w.q_row0 + min(tok, w.tv - 1)) * p.q_stride_token +
                       int64_t(w.head0 + hh) * p.q_stride_head + d]);
  }

  const int window = p.sliding_window;
  const int pos_last = w.pos0 + w.tv - 1;
  const int key_end = pos_last + 1;
  const int key_lo = max(0, w.pos0 - window + 1);
  const int n_begin = key_lo / kKeys * kKeys;
  const float scale = p.scale;
  const float cap = p.soft_cap;

  int row_pos[kRPW];
  float acc[kRPW][kCols];
  float m_run[kRPW];
  float l_run[kRPW];  // this lane's share of the row sum
#pragma unroll
  for (int i = 0; i < kRPW; ++i) {
    row_pos[i] = w.pos0 + min(s.div_hp.div(warp * kRPW + i), w.tv - 1);
    m_run[i] = kNegInf;
    l_run[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[i][c] = 0.0f;
  }

  const T* const kc = static_cast<const T*>(p.key_cache);
  const T* const vc = static_cast<const T*>(p.value_cache);
  const int64_t token_pitch = int64_t(p.num_kv_heads) * D;
  const int32_t* const table = p.block_tables + int64_t(w.seq) * p.block_tables_stride;
  float* const prow = sp + warp * kRPW * kKeys;

  for (int n0 = n_begin; n0 < key_end; n0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and, first time, sq is written)
    if (tid < kKeys) {
      const int key = n0 + tid;
      int64_t off = -1;
      if (key < key_end) {
        const int blk = s.div_block.div(key);
        off = (int64_t(table[blk]) * p.block_size + (key - blk * p.block_size)) * token_pitch +
              int64_t(w.kv_head) * D;
      }
      soff[tid] = off;
    }
    __syncthreads();
    for (int c = tid; c < kKeys * D; c += kThreads) {
      const int r = c / D;
      const int d = c % D;
      const int64_t off = soff[r];
      sk[r * (D + 1) + d] = off >= 0 ? to_float(kc[off + d]) : 0.0f;
      sv[r * D + d] = off >= 0 ? to_float(vc[off + d]) : 0.0f;
    }
    __syncthreads();

    float sc[kRPW];
#pragma unroll
    for (int i = 0; i < kRPW; ++i) sc[i] = 0.0f;
    const float* krow = sk + lane * (D + 1);
    const float* qrows = sq + warp * kRPW * D;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      const float k0 = krow[d], k1 = krow[d + 1], k2 = krow[d + 2], k3 = krow[d + 3];
#pragma unroll
      for (int i = 0; i < kRPW; ++i) {
        const float4 qv = *reinterpret_cast<const float4*>(qrows + i * D + d);
        sc[i] = fmaf(qv.x, k0, fmaf(qv.y, k1, fmaf(qv.z, k2, fmaf(qv.w, k3, sc[i]))));
      }
    }

    const int key = n0 + lane;
#pragma unroll
    for (int i = 0; i < kRPW; ++i) {
      float x = sc[i] * scale;
      if (cap > 0.0f) x = cap * tanhf(x / cap);
      x *= kLog2e;
      if (key > row_pos[i] || key <= row_pos[i] - window) x = kNegInf;
      const float m_new = fmaxf(m_run[i], warp_max(x));
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      const float alpha = exp2f(m_run[i] - m_use);
      const float pe = exp2f(x - m_use);
      m_run[i] = m_new;
      l_run[i] = l_run[i] * alpha + pe;
      prow[i * kKeys + lane] = pe;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[i][c] *= alpha;
    }
    __syncwarp();
    // Four keys at a time: one broadcast 16-byte load of P per row serves 4 * kCols FMAs.
#pragma unroll 2
    for (int k = 0; k < kKeys; k += 4) {
      float4 pk[kRPW];
#pragma unroll
      for (int i = 0; i < kRPW; ++i) pk[i] = *reinterpret_cast<const float4*>(prow + i * kKeys + k);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (D % 32 == 0 || d < D) {
          const float v0 = sv[k * D + d], v1 = sv[(k + 1) * D + d];
          const float v2 = sv[(k + 2) * D + d], v3 = sv[(k + 3) * D + d];
#pragma unroll
          for (int i = 0; i < kRPW; ++i)
            acc[i][c] = fmaf(pk[i].w, v3, fmaf(pk[i].z, v2, fmaf(pk[i].y, v1,
                                                                 fmaf(pk[i].x, v0, acc[i][c]))));
        }
      }
    }
    __syncwarp();  // prow is rewritten by the next tile
  }

  T* const out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kRPW; ++i) {
    const float inv = 1.0f / warp_sum(l_run[i]);
    const int r = warp * kRPW + i;
    const int tok = s.div_hp.div(r);
    const int hh = r - tok * s.heads_per_tile;
    if (tok < w.tv && hh < w.nh) {
      T* const dst = out + int64_t(w.q_row0 + tok) * p.out_stride_token +
                     int64_t(w.head0 + hh) * p.out_stride_head;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < D) dst[d] = from_float<T>(acc[i][c] * inv);
      }
    }
  }
}

}  // namespace sagellm::cuda::prefill
