// Argument checks of int8_linear and int4_linear, shared by the CPU entry
// (quant/cpu/int_linear_cpu.cpp) and the CUDA entry (quant/cuda/int_linear_cuda.cu) so both
// reject the same inputs with the same messages. Device placement and the dtypes a device
// supports are checked by each entry itself.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "cpu/dtype.h"

namespace sagellm::checks {

struct IntLinearDims {
  int64_t m;
  int64_t n;
  int64_t k;
};

inline void check_int_linear_no_overlap(const char* op, const at::Tensor& out, const at::Tensor& t,
                                        const char* name) {
  const at::MemOverlapStatus s = at::get_overlap_status(out, t);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, op,
              ": out overlaps ", name, " in memory; out must be a separate buffer");
}

// input [M, K] (any strides), out [M, N] (innermost dim contiguous), bias [N]: one
// float dtype; k is the K the weight implies (the caller checks the weight's own layout).
inline IntLinearDims check_int_linear_activations(const char* op, const at::Tensor& out,
                                                  const at::Tensor& input, int64_t n,
                                                  const std::optional<at::Tensor>& bias) {
  cpu::kernel_dtype(input, op, "input");
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-d [M, K], got shape ", input.sizes());
  IntLinearDims d{input.size(0), n, input.size(1)};
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), op, ": out has dtype ",
              out.scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == d.m && out.size(1) == d.n, op, ": out has shape ",
              out.sizes(), "; expected [", d.m, ", ", d.n, "] ([M, N] for input [M, K])");
  TORCH_CHECK(out.stride(1) == 1 || d.n <= 1, op, ": out (strides ", out.strides(),
              ") must be contiguous in its last dim");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but input has dtype ", input.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d.n, op, ": bias has shape ", bias->sizes(),
                "; expected [", d.n, "] (N = weight's first dim)");
    TORCH_CHECK(bias->stride(0) == 1 || d.n <= 1, op, ": bias must be contiguous");
  }
  return d;
}

inline void check_int_linear_overlaps(const char* op, const at::Tensor& out,
                                      const at::Tensor& input,
                                      std::initializer_list<const at::Tensor*> others,
                                      std::initializer_list<const char*> names) {
  check_int_linear_no_overlap(op, out, input, "input");
  auto name = names.begin();
  for (const at::Tensor* t : others) {
    if (t != nullptr) check_int_linear_no_overlap(op, out, *t, *name);
    ++name;
  }
}

// out [M, N] = input [M, K] @ (weight [N, K] int8 * scales [N] fp32)^T (+ bias [N]).
inline IntLinearDims check_int8_linear(const at::Tensor& out, const at::Tensor& input,
                                       const at::Tensor& weight, const at::Tensor& scales,
                                       const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_linear";
  TORCH_CHECK(weight.scalar_type() == at::kChar, op, ": weight has dtype ", weight.scalar_type(),
              "; expected int8");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [N, K], got shape ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight (shape ", weight.sizes(), ", strides ",
              weight.strides(), ") must be contiguous");
  const IntLinearDims d = check_int_linear_activations(op, out, input, weight.size(0), bias);
  TORCH_CHECK(weight.size(1) == d.k, op, ": weight has shape ", weight.sizes(), "; expected [N, ",
              d.k, "] (K = input's last dim)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales has dtype ", scales.scalar_type(),
              "; expected float32");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == d.n, op, ": scales has shape ",
              scales.sizes(), "; expected [", d.n, "] (one per output row)");
  TORCH_CHECK(scales.stride(0) == 1 || d.n <= 1, op, ": scales must be contiguous");
  if (d.m == 0 || d.n == 0) return d;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_int_linear_overlaps(op, out, input, {&weight, &scales, b}, {"weight", "scales", "bias"});
  return d;
}

// out [M, N] = input [M, K] @ W^T (+ bias [N]), W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],
// g = k / group_size; weight uint8 [N, K / 2] holds q (k = 2j low nibble, k = 2j + 1 high).
inline IntLinearDims check_int4_linear(const at::Tensor& out, const at::Tensor& input,
                                       const at::Tensor& weight, const at::Tensor& scales,
                                       const std::optional<at::Tensor>& zeros, int64_t group_size,
                                       const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int4_linear";
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, op, ": group_size = ",
              group_size, "; expected 32, 64 or 128");
  TORCH_CHECK(weight.scalar_type() == at::kByte, op, ": weight has dtype ", weight.scalar_type(),
              "; expected uint8 (two 4-bit values per byte)");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [N, K / 2], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight (shape ", weight.sizes(), ", strides ",
              weight.strides(), ") must be contiguous");
  const IntLinearDims d = check_int_linear_activations(op, out, input, weight.size(0), bias);
  TORCH_CHECK(d.k % group_size == 0, op, ": input has K = ", d.k,
              " columns, which is not a multiple of group_size = ", group_size);
  TORCH_CHECK(weight.size(1) * 2 == d.k, op, ": weight has shape ", weight.sizes(),
              "; expected [N, ", d.k / 2, "] (K / 2 bytes per row for K = ", d.k, ")");
  const int64_t groups = d.k / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales has dtype ", scales.scalar_type(),
              "; expected float32");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == d.n && scales.size(1) == groups, op,
              ": scales has shape ", scales.sizes(), "; expected [", d.n, ", ", groups,
              "] ([N, K / group_size])");
  TORCH_CHECK(scales.is_contiguous(), op, ": scales (strides ", scales.strides(),
              ") must be contiguous");
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte, op, ": zeros has dtype ",
                zeros->scalar_type(), "; expected uint8 (values 0..15)");
    TORCH_CHECK(zeros->dim() == 2 && zeros->size(0) == d.n && zeros->size(1) == groups, op,
                ": zeros has shape ", zeros->sizes(), "; expected [", d.n, ", ", groups,
                "] ([N, K / group_size])");
    TORCH_CHECK(zeros->is_contiguous(), op, ": zeros (strides ", zeros->strides(),
                ") must be contiguous");
  }
  if (d.m == 0 || d.n == 0) return d;
  const at::Tensor* z = zeros.has_value() ? &*zeros : nullptr;
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check_int_linear_overlaps(op, out, input, {&weight, &scales, z, b},
                            {"weight", "scales", "zeros", "bias"});
  return d;
}

// zeros values must be 4-bit (0..15); z [N, groups] contiguous uint8 in host memory (the CPU
// entry always, the CUDA entry on a copy when value checks are on).
inline void check_int4_zero_values(const at::Tensor& zeros) {
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  const int64_t count = zeros.numel();
  uint8_t worst = 0;
  for (int64_t i = 0; i < count; ++i) worst = z[i] > worst ? z[i] : worst;
  if (worst < 16) return;
  const int64_t groups = zeros.size(1);
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(z[i] < 16, "int4_linear: zeros[", i / groups, ", ", i % groups, "] = ",
                static_cast<int>(z[i]), " is out of range [0, 16)");
  }
}

}  // namespace sagellm::checks
