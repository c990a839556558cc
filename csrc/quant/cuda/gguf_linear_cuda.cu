// CUDA entries of gguf_linear and gguf_dequantize: the weight stays in its GGUF block format
// (uint8 [N, row_bytes], byte for byte the file's), the same tensor the CPU kernels read.
//
// gguf_linear, out [M, N] = input [M, K] @ dequant(weight)^T (+ bias); fp32, fp16 or bf16 (one
// dtype for input, out and bias). The activations are NOT rounded to int8 here (the CPU kernels
// round them to int8 blocks of 32): this is dequantize-then-matmul with fp32 accumulation.
//   M <= kMaxGemvRows: gemv_kernel (quant/cuda/gguf_decode_cuda.cuh) on panels of up to 8 input
//     rows, each panel one pass over the weight; the dequantized weights are exact fp32 (the
//     gguf package's values), the input exact in fp32, one rounding to out's dtype at the end.
//   larger M: dequant_kernel writes the weight in the input's dtype to a scratch [N, K] (the
//     weight rounded to bf16 / fp16: <= 2^-8 / 2^-11 relative), then cuBLAS (at::mm, fp32
//     accumulation); the bias is added after the product, as dense_linear does.
// kMaxGemvRows: the GEMV reads the weight once per panel of 8 rows and its fp32 FMAs grow with
// M, while dequantize + cuBLAS costs about the same for any small M (writing and re-reading a
// bf16 copy of the weight). For a 4096 x 14336 Q4_0 weight (33 MB; 117 MB as bf16) the GEMV is
// bound by the weight bytes at M = 1 and by fp32 FMAs (~0.5 G per 8 rows) past M ~ 8; the two
// paths should cross between M = 16 and 32. Tune it from benchmarks/ops/bench_gguf_cuda.py.
//
// Both ops are graph-capturable: no host reads of device memory; the scratch and any copy of a
// strided input come from the caching allocator on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "quant/cpu/gguf_checks.h"
#include "quant/cuda/gguf_decode_cuda.cuh"
#include "quant/gguf_dequant_checks.h"

namespace sagellm {
namespace {

using gguf_cuda::DType;

constexpr int64_t kMaxGemvRows = 16;
constexpr int kMaxPanelRows = 8;  // input rows of one gemv_kernel launch
constexpr int kDequantMaxThreads = 256;
constexpr int64_t kDequantMaxCtas = int64_t{1} << 20;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kF32;
    case at::kBFloat16:
      return DType::kBF16;
    default:
      return DType::kF16;
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " is on ", t.device(),
              "; this implementation needs CUDA tensors");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// A view at an odd byte offset cannot be read with the 16-bit loads the kernels use (every GGUF
// block and every scale field is an even number of bytes, so any row of a tensor allocated by
// torch is 2-byte aligned).
void check_weight_address(const at::Tensor& weight, const char* op) {
  const auto addr = reinterpret_cast<uintptr_t>(weight.data_ptr());
  TORCH_CHECK(addr % 2 == 0, op, ": weight's data starts at an odd address (a view at an odd ",
              "byte offset); the CUDA kernels need it 2-byte aligned: pass weight.clone()");
}

// 4 when every block of every row starts on a 4-byte boundary (so 32-bit loads are aligned),
// else 2.
int block_alignment(const at::Tensor& weight, int block_bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(weight.data_ptr());
  const bool four = addr % 4 == 0 && weight.size(1) % 4 == 0 && block_bytes % 4 == 0;
  return four ? 4 : 2;
}

// The shared checks (quant/cpu/gguf_checks.h) accept the CPU kernels' dtypes, fp32 and bf16;
// CUDA adds fp16 under the same dtype rules (out and bias as input), checked here, and runs the
// rest of the shared checks on bf16 views of the fp16 tensors (same shapes, strides, addresses).
checks::GgufLinearDims check_linear(const at::Tensor& out, const at::Tensor& input,
                                    const at::Tensor& weight, int64_t qtype,
                                    const std::optional<at::Tensor>& bias) {
  if (input.scalar_type() != at::kHalf) {
    return checks::check_gguf_linear(out, input, weight, qtype, bias);
  }
  constexpr const char* op = "gguf_linear";
  TORCH_CHECK(out.scalar_type() == at::kHalf, op, ": out has dtype ", out.scalar_type(),
              " but input has dtype ", input.scalar_type());
  std::optional<at::Tensor> bias16;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kHalf, op, ": bias has dtype ", bias->scalar_type(),
                " but input has dtype ", input.scalar_type());
    bias16 = bias->view(at::kBFloat16);
  }
  return checks::check_gguf_linear(out.view(at::kBFloat16), input.view(at::kBFloat16), weight,
                                   qtype, bias16);
}

template <class F, int kAlign, int kRows>
void launch_gemv_rows(const gguf_cuda::GemvArgs& a, cudaStream_t stream) {
  const int64_t ctas = (a.n + gguf_cuda::kRowsPerCta - 1) / gguf_cuda::kRowsPerCta;
  const size_t smem = sizeof(float) * kRows * a.tile;  // <= 32 KiB: no opt-in needed
  gguf_cuda::gemv_kernel<F, kAlign, kRows>
      <<<static_cast<unsigned>(ctas), gguf_cuda::kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class F, int kAlign>
void launch_gemv_align(const gguf_cuda::GemvArgs& a, cudaStream_t stream) {
  if (a.m == 1) return launch_gemv_rows<F, kAlign, 1>(a, stream);
  if (a.m == 2) return launch_gemv_rows<F, kAlign, 2>(a, stream);
  if (a.m <= 4) return launch_gemv_rows<F, kAlign, 4>(a, stream);
  launch_gemv_rows<F, kAlign, 8>(a, stream);
}

// Only formats whose block size is a multiple of 4 can have every block 4-byte aligned.
template <class F>
void launch_gemv(const gguf_cuda::GemvArgs& a, int align, cudaStream_t stream) {
  if constexpr (F::kBytes % 4 == 0) {
    if (align == 4) return launch_gemv_align<F, 4>(a, stream);
  }
  launch_gemv_align<F, 2>(a, stream);
}

template <class F>
void launch_dequant(const gguf_cuda::DequantArgs& a, int align, cudaStream_t stream) {
  const int threads = static_cast<int>(
      std::min<int64_t>(kDequantMaxThreads, (int64_t{a.parts} + 31) / 32 * 32));
  const unsigned ctas = static_cast<unsigned>(std::min<int64_t>(a.rows, kDequantMaxCtas));
  if constexpr (F::kBytes % 4 == 0) {
    if (align == 4) {
      gguf_cuda::dequant_kernel<F, 4><<<ctas, threads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  gguf_cuda::dequant_kernel<F, 2><<<ctas, threads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out [R, K] (any of the three dtypes, unit element stride) = dequant(weight [R, row_bytes]).
void dequantize_into(at::Tensor& out, const at::Tensor& weight, int64_t qtype, int64_t k,
                     int block_bytes) {
  gguf_cuda::DequantArgs a;
  a.weight = weight.data_ptr<uint8_t>();
  a.row_bytes = weight.size(1);
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.rows = weight.size(0);
  a.parts = static_cast<int>(k / 8);
  a.dtype = dtype_of(out);
  const int64_t vec_bytes = 4 * static_cast<int64_t>(out.element_size());
  a.vec = reinterpret_cast<uintptr_t>(out.data_ptr()) % vec_bytes == 0 &&
          (out.stride(0) * out.element_size()) % vec_bytes == 0;
  const int align = block_alignment(weight, block_bytes);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  gguf_parts::visit_format(qtype, [&](auto format) {
    launch_dequant<decltype(format)>(a, align, stream);
  });
}

}  // namespace

void gguf_linear_cuda(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
                      int64_t qtype, std::optional<at::Tensor> bias) {
  constexpr const char* op = "gguf_linear";
  TORCH_CHECK(input_arg.device().is_cuda(), op, ": input is on ", input_arg.device(),
              "; this implementation needs CUDA tensors");
  check_cuda(weight, op, "weight", input_arg, "input");
  check_cuda(out, op, "out", input_arg, "input");
  if (bias.has_value()) check_cuda(*bias, op, "bias", input_arg, "input");
  const checks::GgufLinearDims dims = check_linear(out, input_arg, weight, qtype, bias);
  const int64_t m = dims.m, n = dims.n, k = dims.k;
  if (m == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(input_arg.device());
  if (k == 0) {  // an empty sum: out = bias (or 0), as F.linear gives
    if (bias.has_value()) {
      out.copy_(bias->unsqueeze(0).expand({m, n}));
    } else {
      out.zero_();
    }
    return;
  }
  check_weight_address(weight, op);
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX, op, ": N = ", n, ", K = ", k,
              " exceed the CUDA kernels' 32-bit limits");
  const at::Tensor input = input_arg.stride(1) == 1 ? input_arg : input_arg.contiguous();
  const int block_bytes = dims.format->block_bytes;

  if (m > kMaxGemvRows) {
    at::Tensor w = at::empty({n, k}, input.options());
    dequantize_into(w, weight, qtype, k, block_bytes);
    at::mm_out(out, input, w.t());
    if (bias.has_value()) out.add_(*bias);
    return;
  }

  gguf_cuda::GemvArgs a;
  a.weight = weight.data_ptr<uint8_t>();
  a.row_bytes = weight.size(1);
  a.input_stride = input.stride(0);
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.out_stride = out.stride(0);
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.dtype = dtype_of(input);
  const int align = block_alignment(weight, block_bytes);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto elem = input.element_size();
  for (int64_t r0 = 0; r0 < m; r0 += kMaxPanelRows) {
    a.m = static_cast<int>(std::min<int64_t>(kMaxPanelRows, m - r0));
    const int rows = a.m == 1 ? 1 : a.m == 2 ? 2 : a.m <= 4 ? 4 : 8;  // as launch_gemv_align
    // A tile is a whole number of blocks of every format (256 elements), or all of K.
    const int64_t fit = gguf_cuda::kTileFloats / rows / 256 * 256;
    a.tile = static_cast<int>(std::min<int64_t>(k, fit));
    a.input = static_cast<const char*>(input.data_ptr()) + r0 * input.stride(0) * elem;
    a.out = static_cast<char*>(out.data_ptr()) + r0 * out.stride(0) * elem;
    gguf_parts::visit_format(qtype, [&](auto format) {
      launch_gemv<decltype(format)>(a, align, stream);
    });
  }
}

void gguf_dequantize_cuda(at::Tensor& out, const at::Tensor& weight, int64_t qtype) {
  constexpr const char* op = "gguf_dequantize";
  TORCH_CHECK(weight.device().is_cuda(), op, ": weight is on ", weight.device(),
              "; this implementation needs CUDA tensors");
  check_cuda(out, op, "out", weight, "weight");
  const checks::GgufDequantDims d = checks::check_gguf_dequantize(out, weight, qtype);
  if (d.r == 0 || d.k == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  check_weight_address(weight, op);
  TORCH_CHECK(d.k / 8 <= INT32_MAX, op, ": K = ", d.k, " exceeds the CUDA kernel's 32-bit limit");
  dequantize_into(out, weight, qtype, d.k, d.format->block_bytes);
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CUDA, m) {
  m.impl("gguf_linear", &sagellm::gguf_linear_cuda);
  m.impl("gguf_dequantize", &sagellm::gguf_dequantize_cuda);
}
