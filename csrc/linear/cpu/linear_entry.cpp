// CPU entry point of dense_linear: validate the tensors (linear/linear_checks.h, shared with the
// CUDA entry), describe them to the kernel (linear/cpu/linear_kernels.h), split the weight rows
// over torch's thread pool and dispatch to the active ISA. Instantiations (in the kernel file):
// fp32, fp16, bf16, one dtype for all tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu/dtype.h"
#include "linear/cpu/linear_kernels.h"
#include "linear/linear_checks.h"
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

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " is on ", t.device(),
              "; this implementation needs CPU tensors");
}

}  // namespace

void dense_linear_cpu(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
                      std::optional<at::Tensor> bias) {
  check_cpu(input_arg, "input");
  check_cpu(weight, "weight");
  check_cpu(out, "out");
  if (bias.has_value()) check_cpu(*bias, "bias");
  const checks::LinearDims dims = checks::check_dense_linear(out, input_arg, weight, bias);
  const int64_t m = dims.m, n = dims.n, k = dims.k;
  if (m == 0 || n == 0) return;
  const cpu::DType dtype = cpu::kernel_dtype(input_arg, kOp, "input");

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
