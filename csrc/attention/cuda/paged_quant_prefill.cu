// Paged prefill over a quantized (int8 / float8_e4m3fn) KV cache on CUDA cores, every query
// dtype; also decode with fp32 queries (query_start_loc == nullptr: token i is the one new
// token of sequence i), where the fp16 tensor-core decode of paged_quant.cu would lose fp32
// accuracy.
//
// The work split is paged prefill's (prefill_sched.cuh): a CTA of 4 warps owns 32 query rows
// (tokens x heads of one KV head) and walks the visible keys in tiles of 32, dequantized into
// shared memory as fp32 (stored value x its row's scale, one multiply per element, 4-byte
// loads of the quantized rows), so each K/V byte is read once per tile of query rows. Scores:
// lane k owns key k of the tile (K rows at a pitch of D + 1 floats: no bank conflicts), query
// rows broadcast; O += P V: lane d owns columns d, d + 32, ... . Online softmax in fp32 (exp2 of
// log2e-scaled scores), causal + sliding-window mask, optional tanh soft cap (prefill_ptx.cuh's
// fast_tanh, ~1e-7 absolute).
//
// Bound: FMA throughput and shared-memory loads, like prefill_simt.cuh: prefill is compute-bound
// by the new tokens, and the quantized cache halves (fp16) or quarters (fp32) the bytes read.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention/cuda/attention_cuda.cuh"
#include "attention/cuda/paged_quant.cuh"
#include "attention/cuda/prefill_ptx.cuh"
#include "attention/cuda/prefill_sched.cuh"

namespace sagellm::cuda {
namespace {

using prefill::FastDiv;
using prefill::PrefillSched;

constexpr int kThreads = 128;
constexpr int kWarps = 4;
constexpr int kRows = 32;
constexpr int kRowsPerWarp = 8;
constexpr int kKeys = 32;

template <int D>
constexpr int smem_bytes() {
  // q [kRows][D], k [kKeys][D + 1], v [kKeys][D], p [kWarps][8][kKeys] floats, then the tile's
  // cache slots (int64, -1 past the end) and its k / v scales.
  return (kRows * D + kKeys * (D + 1) + kKeys * D + kWarps * kRowsPerWarp * kKeys) * 4 +
         kKeys * 8 + 2 * kKeys * 4;
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

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

// query_start_loc[i], or i in decode (one token per sequence).
__device__ __forceinline__ int qsl_at(const int32_t* qsl, int i) {
  return qsl != nullptr ? __ldg(qsl + i) : i;
}

// prefill_sched.cuh's find_sequence / locate_tile, reading query_start_loc through qsl_at.
__device__ __forceinline__ int find_seq_any(const int32_t* qsl, int num_seqs, int tile,
                                             const FastDiv& div_tokens) {
  const int lane = threadIdx.x & 31;
  int lo = 0;
  int n = num_seqs;
  while (n > 1) {
    const int step = (n + 31) / 32;
    const int idx = lo + lane * step;
    const bool ok = lane * step < n && div_tokens.div(qsl_at(qsl, idx)) + idx <= tile;
    const unsigned ballot = __ballot_sync(0xffffffffu, ok);
    const int k = 31 - __clz(ballot);
    lo += k * step;
    n = min(step, n - k * step);
  }
  return lo;
}

__device__ __forceinline__ bool locate_any_tile(const PagedAttentionCudaParams& p,
                                            const PrefillSched& s, prefill::TileWork& w) {
  const int hx = static_cast<int>(blockIdx.x % static_cast<unsigned>(s.heads_x));
  const int tile =
      s.total_tiles - 1 - static_cast<int>(blockIdx.x / static_cast<unsigned>(s.heads_x));
  const int seq = find_seq_any(p.query_start_loc, p.num_seqs, tile, s.div_tokens);
  const int q_begin = qsl_at(p.query_start_loc, seq);
  const int q_len = qsl_at(p.query_start_loc, seq + 1) - q_begin;
  const int t0 = (tile - (s.div_tokens.div(q_begin) + seq)) * s.tokens_per_tile;
  const int seq_len = __ldg(p.seq_lens + seq);
  // Unchecked bad input (q_len > seq_len, or beyond the block table) is skipped, never read.
  if (t0 >= q_len || q_len > seq_len ||
      int64_t{seq_len} > int64_t{p.max_blocks_per_seq} * p.block_size)
    return false;
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

template <typename T, int D, KVCacheQuant Q>
__global__ void __launch_bounds__(kThreads)
    qprefill_kernel(const PagedAttentionCudaParams p, const QuantKVParams qk,
                    const PrefillSched s) {
  constexpr int kRPW = kRowsPerWarp;
  constexpr int kCols = (D + 31) / 32;
  constexpr int kWords = D / 4;  // 4-byte words per quantized row
  constexpr float kNegInf = -INFINITY;
  static_assert(D % 4 == 0, "unsupported head size");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* const sq = reinterpret_cast<float*>(smem_raw);  // [kRows][D]
  float* const sk = sq + kRows * D;                       // [kKeys][D + 1]
  float* const sv = sk + kKeys * (D + 1);                 // [kKeys][D]
  float* const sp = sv + kKeys * D;                       // [kWarps][kRPW][kKeys]
  int64_t* const sslot = reinterpret_cast<int64_t*>(sp + kWarps * kRPW * kKeys);
  float* const sks = reinterpret_cast<float*>(sslot + kKeys);
  float* const svs = sks + kKeys;

  prefill::TileWork w;
  if (!locate_any_tile(p, s, w)) return;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  const T* const q = static_cast<const T*>(p.query);
  for (int c = tid; c < kRows * D; c += kThreads) {
    const int r = c / D;
    const int d = c % D;
    const int tok = s.div_hp.div(r);
    const int hh = min(r - tok * s.heads_per_tile, w.nh - 1);
    sq[c] = to_f32(q[int64_t(w.q_row0 + min(tok, w.tv - 1)) * p.q_stride_token +
                     int64_t(w.head0 + hh) * p.q_stride_head + d]);
  }

  const int window = p.sliding_window;
  const int pos_last = w.pos0 + w.tv - 1;
  const int key_end = pos_last + 1;
  const int key_lo = max(0, w.pos0 - window + 1);
  const int n_begin = key_lo / kKeys * kKeys;

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

  const auto* const kc = static_cast<const unsigned char*>(p.key_cache);
  const auto* const vc = static_cast<const unsigned char*>(p.value_cache);
  const int64_t token_pitch = int64_t(p.num_kv_heads) * D;  // bytes
  const int32_t* const table = p.block_tables + int64_t(w.seq) * p.block_tables_stride;
  float* const prow = sp + warp * kRPW * kKeys;

  for (int n0 = n_begin; n0 < key_end; n0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and, first time, sq is written)
    if (tid < kKeys) {
      const int key = n0 + tid;
      int64_t slot = -1;
      if (key < key_end) {
        const int blk = s.div_block.div(key);
        slot = int64_t(__ldg(table + blk)) * p.block_size + (key - blk * p.block_size);
      }
      sslot[tid] = slot;
      const int64_t idx = slot * p.num_kv_heads + w.kv_head;
      sks[tid] = slot >= 0 ? __ldg(qk.k_scales + idx) : 0.0f;
      svs[tid] = slot >= 0 ? __ldg(qk.v_scales + idx) : 0.0f;
    }
    __syncthreads();
    for (int c = tid; c < kKeys * kWords; c += kThreads) {
      const int r = c / kWords;
      const int d = (c - r * kWords) * 4;
      const int64_t slot = sslot[r];
      float kf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float vf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (slot >= 0) {
        const int64_t off = slot * token_pitch + int64_t(w.kv_head) * D + d;
        kvq::to_float4<Q>(__ldg(reinterpret_cast<const uint32_t*>(kc + off)), kf);
        kvq::to_float4<Q>(__ldg(reinterpret_cast<const uint32_t*>(vc + off)), vf);
      }
      const float ks = sks[r];
      const float vs = svs[r];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sk[r * (D + 1) + d + j] = kf[j] * ks;
        sv[r * D + d + j] = vf[j] * vs;
      }
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
      // Not tanhf: --use_fast_math makes it tanh.approx.f32 (2^-11 relative), which times the
      // cap moves fp32 scores far beyond the fp32 tolerance; fast_tanh is ~1e-7 absolute.
      float x = s.cap_scale > 0.0f ? s.cap_scale * prefill::fast_tanh(sc[i] * s.score_scale)
                                   : sc[i] * s.score_scale;
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
    const float l = warp_sum(l_run[i]);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int r = warp * kRPW + i;
    const int tok = s.div_hp.div(r);
    const int hh = r - tok * s.heads_per_tile;
    if (tok < w.tv && hh < w.nh) {
      T* const dst = out + int64_t(w.q_row0 + tok) * p.out_stride_token +
                     int64_t(w.head0 + hh) * p.out_stride_head;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < D) dst[d] = from_f32<T>(acc[i][c] * inv);
      }
    }
  }
}

template <auto kKernel>
void allow_dynamic_smem(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> allowed[kMaxDevices];
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && allowed[device].load(std::memory_order_relaxed) >= bytes) return;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (device < kMaxDevices) allowed[device].store(bytes, std::memory_order_relaxed);
}

// Instantiations: {fp32, fp16, bf16} x 5 head sizes x {int8, e4m3}.
template <typename T, int D, KVCacheQuant Q>
void launch(const PagedAttentionCudaParams& p, const QuantKVParams& q, cudaStream_t stream) {
  constexpr int kSmem = smem_bytes<D>();
  const char* op = p.query_start_loc == nullptr ? "paged_attention_decode"
                                                : "paged_attention_prefill";
  const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(kSmem <= optin, op, ": head_size ", D, " needs ", kSmem,
              " bytes of shared memory per block over a quantized cache; this GPU allows ",
              optin);
  const PrefillSched s = prefill::make_sched(p, kRows);
  const int64_t blocks = prefill::sched_blocks(s);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks,
              " thread blocks exceed the CUDA grid limit");
  allow_dynamic_smem<qprefill_kernel<T, D, Q>>(kSmem);
  qprefill_kernel<T, D, Q><<<static_cast<unsigned>(blocks), kThreads, kSmem, stream>>>(p, q, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_quant(const PagedAttentionCudaParams& p, const QuantKVParams& q,
                  cudaStream_t stream) {
  if (q.kind == KVCacheQuant::kInt8) return launch<T, D, KVCacheQuant::kInt8>(p, q, stream);
  return launch<T, D, KVCacheQuant::kFp8E4M3>(p, q, stream);
}

template <typename T>
void launch_typed(const PagedAttentionCudaParams& p, const QuantKVParams& q,
                  cudaStream_t stream) {
  switch (p.head_size) {
    case 64:
      return launch_quant<T, 64>(p, q, stream);
    case 80:
      return launch_quant<T, 80>(p, q, stream);
    case 96:
      return launch_quant<T, 96>(p, q, stream);
    case 128:
      return launch_quant<T, 128>(p, q, stream);
    case 256:
      return launch_quant<T, 256>(p, q, stream);
  }
  TORCH_CHECK(false, "paged_attention: head_size ", p.head_size,
              " has no CUDA kernel for a quantized cache");
}

}  // namespace

void launch_paged_attention_prefill_quant(const PagedAttentionCudaParams& p,
                                          const QuantKVParams& q, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_seqs == 0) return;
  switch (p.dtype) {
    case AttnDType::kBF16:
      return launch_typed<__nv_bfloat16>(p, q, stream);
    case AttnDType::kF16:
      return launch_typed<__half>(p, q, stream);
    case AttnDType::kF32:
      return launch_typed<float>(p, q, stream);
  }
  TORCH_CHECK(false, "paged_attention: unknown dtype code ", static_cast<int>(p.dtype));
}

}  // namespace sagellm::cuda
