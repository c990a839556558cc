// Paged attention over a quantized KV cache on CUDA: the interface between the entry file
// (attention_cuda_entry.cu) and the kernels (paged_quant.cu: decode; paged_quant_prefill.cu:
// prefill, and decode with fp32 queries), plus the device helpers both kernel files share.
//
// The cache holds int8 or float8_e4m3fn values in the usual [num_blocks, block_size,
// num_kv_heads, head_size] layout, and k_scales / v_scales fp32 [num_blocks, block_size,
// num_kv_heads]: the key (value) of a cached token and KV head is its stored row times its
// scale. Both kernels apply the scales per key, never per element of a row: K's into the score,
// V's into the softmax weight (decode) or once per staged row (prefill).
//
// As in attention_cuda.cuh, grids come from host-known shapes only (CUDA-graph capture safe).
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "attention/cuda/attention_cuda.cuh"

namespace sagellm::cuda {

enum class KVCacheQuant : int { kInt8 = 1, kFp8E4M3 = 2 };

struct QuantKVParams {
  KVCacheQuant kind;
  const float* k_scales;  // [num_blocks * block_size * num_kv_heads]: slot * num_kv_heads + head
  const float* v_scales;
};

// Scratch floats the quantized decode needs for these params (0 when nothing is split).
int64_t quant_decode_workspace_floats(const PagedAttentionCudaParams& p);

// Launch on `stream`; the caller has validated p and q (the cache pointers 16-byte aligned).
void launch_paged_attention_decode_quant(const PagedAttentionCudaParams& p,
                                         const QuantKVParams& q, cudaStream_t stream);
// Also serves decode with fp32 queries: p.query_start_loc == nullptr means one query token per
// sequence (token i belongs to sequence i).
void launch_paged_attention_prefill_quant(const PagedAttentionCudaParams& p,
                                          const QuantKVParams& q, cudaStream_t stream);

namespace kvq {

// Four stored values (one 32-bit word, lowest byte first) as two half2 words (lowest element in
// the low half), exactly: every int8 and every finite e4m3 value is an fp16 value.
template <KVCacheQuant Q>
__device__ __forceinline__ void to_half4(uint32_t w, uint32_t& lo, uint32_t& hi);

template <>
__device__ __forceinline__ void to_half4<KVCacheQuant::kInt8>(uint32_t w, uint32_t& lo,
                                                              uint32_t& hi) {
  // b + 128 as an unsigned byte under an fp16 exponent of 2^10 is the half 1024 + b + 128;
  // subtracting 1152 leaves b (integers below 2048 are exact in fp16). No int->float converts,
  // which run at a quarter of the ALU rate.
  const uint32_t u = w ^ 0x80808080u;
  const uint32_t h0 = __byte_perm(u, 0x64646464u, 0x4140);
  const uint32_t h1 = __byte_perm(u, 0x64646464u, 0x4342);
  const __half2 bias = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
  __half2 a, b;
  memcpy(&a, &h0, 4);
  memcpy(&b, &h1, 4);
  a = __hsub2(a, bias);
  b = __hsub2(b, bias);
  memcpy(&lo, &a, 4);
  memcpy(&hi, &b, 4);
}

template <>
__device__ __forceinline__ void to_half4<KVCacheQuant::kFp8E4M3>(uint32_t w, uint32_t& lo,
                                                                 uint32_t& hi) {
  // One cvt.rn.f16x2.e4m3x2 per pair on sm_89+, a software conversion below.
  const __half2_raw a =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  const __half2_raw b =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> 16), __NV_E4M3);
  lo = uint32_t{a.x} | uint32_t{a.y} << 16;
  hi = uint32_t{b.x} | uint32_t{b.y} << 16;
}

// Four stored values as floats.
template <KVCacheQuant Q>
__device__ __forceinline__ void to_float4(uint32_t w, float (&f)[4]) {
  uint32_t lo, hi;
  to_half4<Q>(w, lo, hi);
  __half2 a, b;
  memcpy(&a, &lo, 4);
  memcpy(&b, &hi, 4);
  const float2 fa = __half22float2(a);
  const float2 fb = __half22float2(b);
  f[0] = fa.x;
  f[1] = fa.y;
  f[2] = fb.x;
  f[3] = fb.y;
}

}  // namespace kvq
}  // namespace sagellm::cuda
