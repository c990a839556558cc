// SiLU-and-mul and GELU-and-mul (erf and tanh) on CUDA: out[r, :d] = round(act(x[r, :d])) *
// x[r, d:], rounded where HF's MLPs round (the activation to the dtype, then the product). Same
// schemas and checks (common/elementwise_checks.h) as the CPU kernels; fp32 math.
//
// Memory-bound: 3 x d elements per row, with 16-byte loads/stores when the rows allow, else
// element by element. Instantiations: fp32, fp16, bf16 x 3 activations x (16-byte, element-wise).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "common/elementwise_checks.h"
#include "elementwise/cuda/elementwise_cuda.cuh"

namespace sagellm {
namespace cuda_ew {

// ---- Gated activations ------------------------------------------------------------------------
//
// out[r, :d] = round(act(x[r, :d])) * x[r, d:]. A CTA covers rows_per_cta rows (grid-stride in
// x) and one tile of kActUnroll * tx packs of each (grid y); each thread loads its kActUnroll
// gate/up packs before computing any.

enum class Act : int { kSilu = 0, kGeluErf = 1, kGeluTanh = 2 };
constexpr int kActUnroll = 4;
constexpr int kActThreads = 256;

template <typename T>
struct ActArgs {
  T* out;
  checks::Rows out_rows;
  const T* in;
  checks::Rows in_rows;
  int64_t rows;
  int64_t d;
  int64_t packs;  // per row: d / N
  int tx;         // threads per row (power of two)
};

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the tanh form without its cancellation.
__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = x * fmaf(0.044715f * x, x, 1.0f);
  return x / (1.0f + __expf(-2.0f * 0.7978845608028654f * u));
}

// x * Phi(x), Phi(x) = 1 - erfc(x / sqrt 2) / 2 for x >= 0 and erfc(|x| / sqrt 2) / 2 below, so
// neither tail cancels. erfc(z), z >= 0, by Hastings' approximation (Abramowitz & Stegun
// 7.1.26, absolute error <= 1.5e-7), as on the CPU: a third of the instructions of erfcf, which
// would make this kernel compute-bound.
__device__ __forceinline__ float gelu_erf(float x) {
  const float z = fabsf(x) * 0.70710678118654752f;
  const float t = 1.0f / fmaf(0.3275911f, z, 1.0f);
  float poly = fmaf(1.061405429f, t, -1.453152027f);
  poly = fmaf(poly, t, 1.421413741f);
  poly = fmaf(poly, t, -0.284496736f);
  poly = fmaf(poly, t, 0.254829592f);
  const float half_erfc = 0.5f * poly * t * __expf(-z * z);
  return x * (x < 0.0f ? half_erfc : 1.0f - half_erfc);
}

template <Act A>
__device__ __forceinline__ float activate(float x) {
  if constexpr (A == Act::kSilu) return silu(x);
  if constexpr (A == Act::kGeluErf) return gelu_erf(x);
  if constexpr (A == Act::kGeluTanh) return gelu_tanh(x);
}

template <typename T, int N, Act A>
__global__ void __launch_bounds__(kActThreads, 4) gated_act_kernel(const ActArgs<T> a) {
  using P = Pack<T, N>;
  const int tx = threadIdx.x % a.tx;
  const int rows_per_cta = blockDim.x / a.tx;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kActUnroll * a.tx + tx;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_cta + threadIdx.x / a.tx;
       row < a.rows; row += static_cast<int64_t>(gridDim.x) * rows_per_cta) {
    const P* gate = reinterpret_cast<const P*>(a.in + row_start(a.in_rows, row));
    const P* up = reinterpret_cast<const P*>(a.in + row_start(a.in_rows, row) + a.d);
    P* out = reinterpret_cast<P*>(a.out + row_start(a.out_rows, row));
    P g[kActUnroll], u[kActUnroll];
#pragma unroll
    for (int j = 0; j < kActUnroll; ++j) {
      const int64_t c = c0 + j * a.tx;
      if (c < a.packs) {
        g[j] = gate[c];
        u[j] = up[c];
      }
    }
#pragma unroll
    for (int j = 0; j < kActUnroll; ++j) {
      const int64_t c = c0 + j * a.tx;
      if (c < a.packs) {
        float fg[N], fu[N];
        to_floats(g[j], fg);
        to_floats(u[j], fu);
#pragma unroll
        for (int e = 0; e < N; ++e) fg[e] = activate<A>(fg[e]);
        round_floats<T>(fg);
#pragma unroll
        for (int e = 0; e < N; ++e) fg[e] *= fu[e];
        P o;
        from_floats(fg, o);
        out[c] = o;
      }
    }
  }
}

template <typename T, int N, Act A>
void launch_act(ActArgs<T> a, cudaStream_t stream) {
  a.packs = a.d / N;
  a.tx = static_cast<int>(std::min<int64_t>(kActThreads,
                                            next_pow2(ceil_div(a.packs, kActUnroll))));
  const int64_t tiles = ceil_div(a.packs, static_cast<int64_t>(kActUnroll) * a.tx);
  TORCH_CHECK(tiles <= 65535, "gated activation: d = ", a.d, " is too large for one launch");
  const int64_t row_groups = ceil_div(a.rows, kActThreads / a.tx);
  const dim3 grid(static_cast<unsigned>(std::min(row_groups, kMaxGridX)),
                  static_cast<unsigned>(tiles));
  gated_act_kernel<T, N, A><<<grid, kActThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Act A>
void dispatch_act(const ActArgs<T>& a, bool vec, cudaStream_t stream) {
  if (vec) {
    launch_act<T, kPack16<T>, A>(a, stream);
  } else {
    launch_act<T, 1, A>(a, stream);
  }
}

void gated_act_cuda(const char* op, at::Tensor& out, const at::Tensor& input_arg,
                    Act act) {
  check_cuda(input_arg, op, "input");
  check_same_device(out, input_arg, op, "out", "input");
  const int64_t d = checks::check_gated_act(op, out, input_arg);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(input_arg.device());
  at::Tensor input = input_arg;
  const checks::Rows out_rows = checks::output_rows(out, op, "out");
  const checks::Rows in_rows = checks::input_rows(input);
  const int64_t esize = input.element_size();
  const bool vec = (d * esize) % 16 == 0 && rows_aligned16(out.data_ptr(), out_rows, esize) &&
                   rows_aligned16(input.data_ptr(), in_rows, esize);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_dtype(input.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    ActArgs<T> a{};
    a.out = static_cast<T*>(out.data_ptr());
    a.out_rows = out_rows;
    a.in = static_cast<const T*>(input.data_ptr());
    a.in_rows = in_rows;
    a.rows = out.numel() / d;
    a.d = d;
    switch (act) {
      case Act::kSilu:
        return dispatch_act<T, Act::kSilu>(a, vec, stream);
      case Act::kGeluErf:
        return dispatch_act<T, Act::kGeluErf>(a, vec, stream);
      case Act::kGeluTanh:
        return dispatch_act<T, Act::kGeluTanh>(a, vec, stream);
    }
  });
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& input) {
  gated_act_cuda("silu_and_mul", out, input, Act::kSilu);
}

void gelu_and_mul_cuda(at::Tensor& out, const at::Tensor& input, c10::string_view approximate) {
  const bool tanh = checks::gelu_uses_tanh(approximate);
  gated_act_cuda("gelu_and_mul", out, input, tanh ? Act::kGeluTanh : Act::kGeluErf);
}

}  // namespace cuda_ew
}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("silu_and_mul", &sagellm::cuda_ew::silu_and_mul_cuda);
  m.impl("gelu_and_mul", &sagellm::cuda_ew::gelu_and_mul_cuda);
}
