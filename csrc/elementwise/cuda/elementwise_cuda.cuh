// Helpers of the fused small CUDA ops (norm_cuda.cu, activation_cuda.cu, rotary_cuda.cu). Device
// side: packs of elements moved with one 16-byte load or store, fp32 conversions with
// round-to-nearest-even back to fp16/bf16, the row addressing shared with the CPU entry
// (checks::Rows). Host side: dtype dispatch, device and alignment checks, launch arithmetic.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/elementwise_checks.h"
#include "common/index_checks.h"

namespace sagellm::cuda_ew {

// N elements of T. alignas(N * sizeof(T)) lets a 16-byte pack compile to one LDG.128/STG.128;
// packs smaller than 16 bytes are used only where their alignment is guaranteed (N = 1), or are
// moved element by element (load_pack<.., false>).
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

// Elements per 16-byte pack.
template <typename T>
constexpr int kPack16 = 16 / static_cast<int>(sizeof(T));

template <bool kAligned, typename T, int N>
__device__ __forceinline__ void load_pack(Pack<T, N>& dst, const T* p) {
  if constexpr (kAligned) {
    dst = *reinterpret_cast<const Pack<T, N>*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst.v[i] = p[i];
  }
}

template <bool kAligned, typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& src) {
  if constexpr (kAligned) {
    *reinterpret_cast<Pack<T, N>*>(p) = src;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = src.v[i];
  }
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
// bf16 is the top half of an fp32: a shift, where __bfloat162float on sm_90 issues a conversion
// per element (cvt.f32.bf16) and costs registers to unpack the halves.
__device__ __forceinline__ float to_f(__nv_bfloat16 x) {
  return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(x)) << 16);
}

// Pairs of 16-bit elements are handled as one 32-bit word (memcpy compiles to register moves):
// element by element, ptxas unpacks every half into a register of its own right after the load,
// which doubles the registers a pack needs and made the bf16 kernels spill.
template <typename T, int N>
__device__ __forceinline__ void to_floats(const Pack<T, N>& in, float (&out)[N]) {
  if constexpr (std::is_same_v<T, float> || N % 2 != 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f(in.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      uint32_t w;
      memcpy(&w, &in.v[i], sizeof(w));
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        out[i] = __uint_as_float(w << 16);
        out[i + 1] = __uint_as_float(w & 0xffff0000u);
      } else {
        __half2 h;
        memcpy(&h, &w, sizeof(w));
        const float2 f = __half22float2(h);
        out[i] = f.x;
        out[i + 1] = f.y;
      }
    }
  }
}

// Round to nearest even; pairs go through one packed conversion (cvt.rn.{bf16,f16}x2.f32), which
// halves the conversion instructions of a memory-bound kernel.
template <typename T, int N>
__device__ __forceinline__ void from_floats(const float (&in)[N], Pack<T, N>& out) {
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < N; ++i) out.v[i] = in[i];
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      if constexpr (std::is_same_v<T, __half>) {
        const __half2 h = __floats2half2_rn(in[i], in[i + 1]);
        memcpy(&out.v[i], &h, sizeof(h));
      } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(in[i], in[i + 1]);
        memcpy(&out.v[i], &h, sizeof(h));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (std::is_same_v<T, __half>) {
        out.v[i] = __float2half_rn(in[i]);
      } else {
        out.v[i] = __float2bfloat16_rn(in[i]);
      }
    }
  }
}

// Each value rounded to T's precision and back (identity for float): where Hugging Face's
// modules hold an intermediate in the model's dtype, the kernels round it too.
template <typename T, int N>
__device__ __forceinline__ void round_floats(float (&f)[N]) {
  if constexpr (!std::is_same_v<T, float>) {
    Pack<T, N> tmp;
    from_floats(f, tmp);
    to_floats(tmp, f);
  }
}

__device__ __forceinline__ int64_t row_start(const checks::Rows& l, int64_t r) {
  return (r / l.inner) * l.outer_stride + (r % l.inner) * l.inner_stride;
}

// ---- Host side (the entry files) ---------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) with T the device type of `st` (validated before: fp32, fp16 or bf16).
template <typename Fn>
void with_dtype(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kHalf:
      return fn(Tag<__half>{});
    case at::kBFloat16:
      return fn(Tag<__nv_bfloat16>{});
    default:
      return fn(Tag<float>{});
  }
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " is on ", t.device(),
              "; this implementation needs CUDA tensors");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// Index values are read back to the host only when asked for, and never inside graph capture.
inline bool check_index_values_now() {
  return cuda_index_checks_enabled() && c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                                            c10::cuda::CaptureStatus::None;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every row start of `rows` over base `p` is 16-byte aligned.
inline bool rows_aligned16(const void* p, const checks::Rows& rows, int64_t esize) {
  return aligned16(p) && (rows.outer_stride * esize) % 16 == 0 &&
         (rows.inner_stride * esize) % 16 == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

constexpr int64_t kMaxGridX = INT_MAX;

}  // namespace sagellm::cuda_ew
