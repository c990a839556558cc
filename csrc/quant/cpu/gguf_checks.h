// Argument checks of gguf_linear, written so a CUDA entry can share them (same inputs rejected,
// same messages). Device placement is checked by each entry itself.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "quant/cpu/gguf_formats.h"

namespace sagellm::checks {

struct GgufLinearDims {
  int64_t m;
  int64_t n;
  int64_t k;
  const cpu::gguf::FormatInfo* format;
};

inline void check_gguf_no_overlap(const at::Tensor& out, const at::Tensor& t, const char* name) {
  const at::MemOverlapStatus s = at::get_overlap_status(out, t);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial,
              "gguf_linear: out overlaps ", name, " in memory; out must be a separate buffer");
}

// out [M, N] = input [M, K] @ dequant(weight [N, row_bytes], qtype)^T (+ bias [N]).
inline GgufLinearDims check_gguf_linear(const at::Tensor& out, const at::Tensor& input,
                                        const at::Tensor& weight, int64_t qtype,
                                        const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "gguf_linear";
  const cpu::gguf::FormatInfo* f = cpu::gguf::format_info(qtype);
  TORCH_CHECK(f != nullptr, op, ": qtype = ", qtype,
              " is not a supported GGML type; expected one of Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, "
              "Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16, op,
              ": input has dtype ", input.scalar_type(), "; expected float32 or bfloat16");
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-d [M, K], got shape ", input.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kByte, op, ": weight has dtype ", weight.scalar_type(),
              "; expected uint8 (the GGUF blocks as stored in the file)");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [N, row_bytes], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight (shape ", weight.sizes(), ", strides ",
              weight.strides(), ") must be contiguous");
  GgufLinearDims d{input.size(0), weight.size(0), input.size(1), f};
  TORCH_CHECK(d.k % f->block_elems == 0, op, ": input has K = ", d.k, " columns, which is not a ",
              "multiple of the ", f->name, " block size ", f->block_elems);
  const int64_t row_bytes = d.k / f->block_elems * f->block_bytes;
  TORCH_CHECK(weight.size(1) == row_bytes, op, ": weight has shape ", weight.sizes(),
              "; expected [N, ", row_bytes, "] (K = ", d.k, " is ", d.k / f->block_elems, " ",
              f->name, " blocks of ", f->block_bytes, " bytes)");
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), op, ": out has dtype ",
              out.scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == d.m && out.size(1) == d.n, op, ": out has shape ",
              out.sizes(), "; expected [", d.m, ", ", d.n,
              "] ([M, N] for input [M, K] and weight [N, row_bytes])");
  TORCH_CHECK(out.stride(1) == 1 || d.n <= 1, op, ": out (strides ", out.strides(),
              ") must be contiguous in its last dim");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but input has dtype ", input.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d.n, op, ": bias has shape ", bias->sizes(),
                "; expected [", d.n, "] (N = weight's first dim)");
    TORCH_CHECK(bias->stride(0) == 1 || d.n <= 1, op, ": bias must be contiguous");
  }
  if (d.m == 0 || d.n == 0) return d;
  check_gguf_no_overlap(out, input, "input");
  check_gguf_no_overlap(out, weight, "weight");
  if (bias.has_value()) check_gguf_no_overlap(out, *bias, "bias");
  return d;
}

}  // namespace sagellm::checks
