// Argument checks of dense_linear, shared by the CPU entry (linear/cpu/linear_entry.cpp) and the
// CUDA entry (linear/cuda/dense_linear_cuda.cu) so both reject the same inputs with the same
// messages. Device placement is checked by each entry itself.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "cpu/dtype.h"

namespace sagellm::checks {

struct LinearDims {
  int64_t m;
  int64_t n;
  int64_t k;
};

inline void check_linear_tensor(const at::Tensor& t, const char* name, const at::Tensor& input,
                                int64_t dim) {
  constexpr const char* op = "dense_linear";
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-d, got shape ", t.sizes());
}

inline void check_no_overlap(const at::Tensor& out, const at::Tensor& t, const char* name) {
  const at::MemOverlapStatus s = at::get_overlap_status(out, t);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial,
              "dense_linear: out overlaps ", name, " in memory; out must be a separate buffer");
}

// out [M, N] = input [M, K] @ weight [N, K]^T (+ bias [N]): dtypes, shapes, strides, and (when
// there is anything to compute) that out shares no memory with an operand.
inline LinearDims check_dense_linear(const at::Tensor& out, const at::Tensor& input,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "dense_linear";
  cpu::kernel_dtype(input, op, "input");
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-d [M, K], got shape ", input.sizes());
  check_linear_tensor(weight, "weight", input, 2);
  check_linear_tensor(out, "out", input, 2);
  LinearDims d{input.size(0), weight.size(0), input.size(1)};
  TORCH_CHECK(weight.size(1) == d.k, op, ": weight has shape ", weight.sizes(), "; expected [N, ",
              d.k, "] (K = input's last dim)");
  TORCH_CHECK(weight.is_contiguous(), op, ": weight (shape ", weight.sizes(), ", strides ",
              weight.strides(), ") must be contiguous");
  TORCH_CHECK(out.size(0) == d.m && out.size(1) == d.n, op, ": out has shape ", out.sizes(),
              "; expected [", d.m, ", ", d.n,
              "] ([M, N] for input [M, K] and weight [N, K])");
  TORCH_CHECK(out.stride(1) == 1 || d.n <= 1, op, ": out (strides ", out.strides(),
              ") must be contiguous in its last dim");
  if (bias.has_value()) {
    check_linear_tensor(*bias, "bias", input, 1);
    TORCH_CHECK(bias->size(0) == d.n, op, ": bias has shape ", bias->sizes(), "; expected [",
                d.n, "] (N = weight's first dim)");
    TORCH_CHECK(bias->stride(0) == 1 || d.n <= 1, op, ": bias must be contiguous");
  }
  if (d.m == 0 || d.n == 0) return d;
  check_no_overlap(out, input, "input");
  check_no_overlap(out, weight, "weight");
  if (bias.has_value()) check_no_overlap(out, *bias, "bias");
  return d;
}

}  // namespace sagellm::checks
