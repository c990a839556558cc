// CPU entry point of dense_linear: validate the tensors, describe them to the kernel
// (linear/cpu/linear_kernels.h), split the weight rows over torch's thread pool and dispatch to
// the active ISA. Instantiations (in the kernel file): fp32, fp16, bf16, one dtype for all
// tensors.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "linear/cpu/linear_kernels.h"
#include "cpu/dtype.h"
#include "ops.h"

namespace sagellm {
namespace {

constexpr const char* kOp = "dense_linear";

// A task should stream about a megabyte of weight. Less and the thread wake-up (~5 us) costs
// more than the second core saves; worse, on a machine whose cores are busy with other work a
// parallel region waits a whole scheduler tick (~4 ms) for its second thread, so small layers
// (most decode GEMVs of a small model) run on the calling thread, where one core alone still
// streams 2x faster than MKL's sgemv.
constexpr int64_t kMinWeightBytesPerTask = 1024 * 1024;

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& input,
                  int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " is on ", t.device(),
              "; this implementation needs CPU tensors");
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), kOp, ": ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(t.dim() == dim, kOp, ": ", name, " must be ", dim, "-d, got shape ", t.sizes());
}

void check_no_overlap(const at::Tensor& out, const at::Tensor& t, const char* name) {
  const at::MemOverlapStatus s = at::get_overlap_status(out, t);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, kOp,
              ": out overlaps ", name, " in memory; out must be a separate buffer");
}

}  // namespace

void dense_linear_cpu(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
                      std::optional<at::Tensor> bias) {
  TORCH_CHECK(input_arg.device().is_cpu(), kOp, ": input is on ", input_arg.device(),
              "; this implementation needs CPU tensors");
  const cpu::DType dtype = cpu::kernel_dtype(input_arg, kOp, "input");
  TORCH_CHECK(input_arg.dim() == 2, kOp, ": input must be 2-d [M, K], got shape ",
              input_arg.sizes());
  check_tensor(weight, "weight", input_arg, 2);
  check_tensor(out, "out", input_arg, 2);
  const int64_t m = input_arg.size(0);
  const int64_t k = input_arg.size(1);
  const int64_t n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, kOp, ": weight has shape ", weight.sizes(), "; expected [N, ",
              k, "] (K = input's last dim)");
  TORCH_CHECK(weight.is_contiguous(), kOp, ": weight (shape ", weight.sizes(), ", strides ",
              weight.strides(), ") must be contiguous");
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, kOp, ": out has shape ", out.sizes(),
              "; expected [", m, ", ", n, "] ([M, N] for input [M, K] and weight [N, K])");
  TORCH_CHECK(out.stride(1) == 1 || n <= 1, kOp, ": out (strides ", out.strides(),
              ") must be contiguous in its last dim");
  if (bias.has_value()) {
    check_tensor(*bias, "bias", input_arg, 1);
    TORCH_CHECK(bias->size(0) == n, kOp, ": bias has shape ", bias->sizes(), "; expected [", n,
                "] (N = weight's first dim)");
    TORCH_CHECK(bias->stride(0) == 1 || n <= 1, kOp, ": bias must be contiguous");
  }
  if (m == 0 || n == 0) return;
  check_no_overlap(out, input_arg, "input");
  check_no_overlap(out, weight, "weight");
  if (bias.has_value()) check_no_overlap(out, *bias, "bias");

  // Inputs are a few KB at decode sizes: a layout the kernel cannot read is copied.
  const at::Tensor input = (input_arg.stride(1) == 1 || k <= 1) ? input_arg
                                                                 : input_arg.contiguous();
  cpu::DenseLinearParams p;
  p.dtype = dtype;
  p.input = input.data_ptr();
  p.input_row_stride = input.stride(0);
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_row_stride = out.stride(0);
  p.m = m;
  p.n = n;
  p.k = k;
  const int64_t rows = cpu::kDenseLinearRowsPerUnit;
  const int64_t units = (n + rows - 1) / rows;
  const int64_t unit_bytes = std::max<int64_t>(1, rows * k * input.element_size());
  const int64_t grain = std::max<int64_t>(1, kMinWeightBytesPerTask / unit_bytes);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    SAGELLM_CPU_DISPATCH(dense_linear_kernel, p, begin, end);
  });
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("dense_linear", &sagellm::dense_linear_cpu); }
