// RMSNorm and fused add + RMSNorm on CUDA. Same schemas, checks (common/elementwise_checks.h) and
// rounding points as the CPU kernels (HF LlamaRMSNorm): fp32 math, the normalised value rounded
// to the dtype before the weight multiply, the result rounded to nearest even.
//
// Memory-bound: rms_norm moves 2 x hidden elements per row, fused_add_rms_norm 4 x hidden (the
// weight stays in L1/L2), with 16-byte loads/stores when the rows allow (hidden a multiple of 8
// halves / 4 floats, 16-byte aligned row starts), else element by element. Instantiations:
// fp32, fp16, bf16 x (16-byte, element-wise) x (plain, fused).
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

// ---- RMSNorm ----------------------------------------------------------------------------------
//
// A group of `group` threads per row: a power of two <= 32 (several rows per 256-thread CTA,
// shuffle reduction) or the whole CTA (one row, shuffle + shared-memory reduction). Each thread
// holds up to max_packs<kFused> packs in registers (8 for rms_norm, 4 each of input and residual
// for the fused op: 128 bytes of loads in flight per thread either way), and the host sizes the
// group to fill them, so a row of up to 32K (fused: 16K) bf16 elements is read from DRAM once;
// longer rows re-read their tail from L2. 64 registers per thread at most, so 1024 threads fit
// an SM: 128 KiB of loads in flight per SM.

constexpr int kNormMaxThreads = 512;

template <bool kFused>
constexpr int max_packs() {
  return kFused ? 4 : 8;
}

template <typename T>
struct NormArgs {
  T* out;  // rms_norm: out; fused: input (overwritten with the normalised sum)
  checks::Rows out_rows;
  const T* in;  // rms_norm: input; fused: input (read before it is written)
  checks::Rows in_rows;
  T* residual;  // fused only
  checks::Rows residual_rows;
  const T* weight;
  int64_t rows;
  int hidden;
  int packs;  // per row: hidden / N
  int group;
  float eps;
};

__device__ __forceinline__ float group_sum(float v, int group, float* warp_sums) {
  const int width = group < 32 ? group : 32;
  for (int off = width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (group <= 32) return v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, int N>
__device__ __forceinline__ float sum_squares(const Pack<T, N>& x) {
  float f[N];
  to_floats(x, f);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) s = fmaf(f[i], f[i], s);
  return s;
}

// round(input + residual), as stored in the residual stream.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> add_round(const Pack<T, N>& a, const Pack<T, N>& b) {
  float fa[N], fb[N];
  to_floats(a, fa);
  to_floats(b, fb);
#pragma unroll
  for (int i = 0; i < N; ++i) fa[i] += fb[i];
  Pack<T, N> r;
  from_floats(fa, r);
  return r;
}

// round(round(x * inv_rms) * w): HF LlamaRMSNorm's two roundings.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> scale(const Pack<T, N>& x, float inv_rms,
                                            const Pack<T, N>& w) {
  float f[N], fw[N];
  to_floats(x, f);
  to_floats(w, fw);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] *= inv_rms;
  round_floats<T>(f);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] *= fw[i];
  Pack<T, N> r;
  from_floats(f, r);
  return r;
}

template <typename T, int N, bool kFused>
__global__ void __launch_bounds__(kNormMaxThreads, 2) rms_norm_kernel(const NormArgs<T> a) {
  using P = Pack<T, N>;
  constexpr int kMaxPacks = max_packs<kFused>();
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % a.group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / a.group) +
                      threadIdx.x / a.group;
  // Rows past the end still join the reduction (shuffles need every lane), with nothing to add.
  const bool active = row < a.rows;
  const int packs = active ? a.packs : 0;
  P* out = reinterpret_cast<P*>(a.out + (active ? row_start(a.out_rows, row) : 0));
  const P* in = reinterpret_cast<const P*>(a.in + (active ? row_start(a.in_rows, row) : 0));
  P* res = nullptr;
  if constexpr (kFused) {
    res = reinterpret_cast<P*>(a.residual + (active ? row_start(a.residual_rows, row) : 0));
  }
  const P* w = reinterpret_cast<const P*>(a.weight);

  // All loads of the row are issued before the first store, so they overlap.
  P x[kMaxPacks];
  P r[kFused ? kMaxPacks : 1];
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int i = lane + k * a.group;
    if (i < packs) {
      x[k] = in[i];
      if constexpr (kFused) r[k] = res[i];
    }
  }
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int i = lane + k * a.group;
    if (i < packs) {
      if constexpr (kFused) {
        x[k] = add_round(x[k], r[k]);
        res[i] = x[k];
      }
      ss += sum_squares(x[k]);
    }
  }
  for (int i = lane + kMaxPacks * a.group; i < packs; i += a.group) {
    P v = in[i];
    if constexpr (kFused) {
      const P rv = res[i];
      v = add_round(v, rv);
      res[i] = v;
    }
    ss += sum_squares(v);
  }
  ss = group_sum(ss, a.group, warp_sums);
  if (!active) return;
  const float inv_rms = rsqrtf(ss / static_cast<float>(a.hidden) + a.eps);
  // Weight packs are copied whole (one 16-byte load each; the ALU reads them element-wise).
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int i = lane + k * a.group;
    if (i < packs) {
      const P wk = w[i];
      out[i] = scale(x[k], inv_rms, wk);
    }
  }
  // The tail was read in the first pass by this same thread (and, fused, written to res).
  for (int i = lane + kMaxPacks * a.group; i < packs; i += a.group) {
    const P v = kFused ? res[i] : in[i];
    const P wk = w[i];
    out[i] = scale(v, inv_rms, wk);
  }
}

template <typename T, int N, bool kFused>
void launch_norm(NormArgs<T> a, cudaStream_t stream) {
  a.packs = a.hidden / N;
  const int64_t want = ceil_div(a.packs, max_packs<kFused>());
  int threads;
  if (want <= 32) {
    a.group = next_pow2(want);
    threads = 256;
  } else {
    a.group = static_cast<int>(std::min<int64_t>(kNormMaxThreads, ceil_div(want, 32) * 32));
    threads = a.group;
  }
  const int64_t blocks = ceil_div(a.rows, threads / a.group);
  TORCH_CHECK(blocks <= kMaxGridX, kFused ? "fused_add_rms_norm" : "rms_norm", ": ", a.rows,
              " rows is too many for one launch");
  rms_norm_kernel<T, N, kFused><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kFused>
void dispatch_norm(NormArgs<T> a, bool vec, cudaStream_t stream) {
  if (vec) {
    launch_norm<T, kPack16<T>, kFused>(a, stream);
  } else {
    launch_norm<T, 1, kFused>(a, stream);
  }
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
                   double epsilon) {
  const char* op = "rms_norm";
  check_cuda(input_arg, op, "input");
  check_same_device(weight, input_arg, op, "weight", "input");
  check_same_device(out, input_arg, op, "out", "input");
  checks::check_rms_norm(out, input_arg, weight, epsilon);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(input_arg.device());
  at::Tensor input = input_arg;
  const checks::Rows out_rows = checks::output_rows(out, op, "out");
  const checks::Rows in_rows = checks::input_rows(input);
  const int64_t hidden = input.size(-1);
  TORCH_CHECK(hidden <= INT_MAX, op, ": hidden = ", hidden, " is too large");
  const int64_t esize = input.element_size();
  const bool vec = (hidden * esize) % 16 == 0 && aligned16(weight.data_ptr()) &&
                   rows_aligned16(out.data_ptr(), out_rows, esize) &&
                   rows_aligned16(input.data_ptr(), in_rows, esize);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_dtype(input.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    NormArgs<T> a{};
    a.out = static_cast<T*>(out.data_ptr());
    a.out_rows = out_rows;
    a.in = static_cast<const T*>(input.data_ptr());
    a.in_rows = in_rows;
    a.weight = static_cast<const T*>(weight.data_ptr());
    a.rows = input.numel() / hidden;
    a.hidden = static_cast<int>(hidden);
    a.eps = static_cast<float>(epsilon);
    dispatch_norm<T, false>(a, vec, stream);
  });
}

void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                             double epsilon) {
  const char* op = "fused_add_rms_norm";
  check_cuda(input, op, "input");
  check_same_device(weight, input, op, "weight", "input");
  check_same_device(residual, input, op, "residual", "input");
  checks::check_fused_add_rms_norm(input, residual, weight, epsilon);
  if (input.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const checks::Rows in_rows = checks::output_rows(input, op, "input");
  const checks::Rows res_rows = checks::output_rows(residual, op, "residual");
  const int64_t hidden = input.size(-1);
  TORCH_CHECK(hidden <= INT_MAX, op, ": hidden = ", hidden, " is too large");
  const int64_t esize = input.element_size();
  const bool vec = (hidden * esize) % 16 == 0 && aligned16(weight.data_ptr()) &&
                   rows_aligned16(input.data_ptr(), in_rows, esize) &&
                   rows_aligned16(residual.data_ptr(), res_rows, esize);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_dtype(input.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    NormArgs<T> a{};
    a.out = static_cast<T*>(input.data_ptr());
    a.out_rows = in_rows;
    a.in = static_cast<const T*>(input.data_ptr());
    a.in_rows = in_rows;
    a.residual = static_cast<T*>(residual.data_ptr());
    a.residual_rows = res_rows;
    a.weight = static_cast<const T*>(weight.data_ptr());
    a.rows = input.numel() / hidden;
    a.hidden = static_cast<int>(hidden);
    a.eps = static_cast<float>(epsilon);
    dispatch_norm<T, true>(a, vec, stream);
  });
}

}  // namespace cuda_ew
}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("rms_norm", &sagellm::cuda_ew::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &sagellm::cuda_ew::fused_add_rms_norm_cuda);
}
