// Argument checks of gguf_dequantize, shared by the CPU entry (quant/cpu/gguf_dequant_cpu.cpp)
// and the CUDA entry (quant/cuda/gguf_linear_cuda.cu): same inputs rejected, same messages.
// Device placement is checked by each entry itself.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "quant/cpu/gguf_formats.h"

namespace sagellm::checks {

struct GgufDequantDims {
  int64_t r;  // rows
  int64_t k;  // elements per row
  const cpu::gguf::FormatInfo* format;
};

// out [R, K] (fp32, fp16 or bf16) = dequant(weight uint8 [R, row_bytes], qtype).
inline GgufDequantDims check_gguf_dequantize(const at::Tensor& out, const at::Tensor& weight,
                                             int64_t qtype) {
  constexpr const char* op = "gguf_dequantize";
  const cpu::gguf::FormatInfo* f = cpu::gguf::format_info(qtype);
  TORCH_CHECK(f != nullptr, op, ": qtype = ", qtype,
              " is not a supported GGML type; expected one of Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, "
              "Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14");
  TORCH_CHECK(weight.scalar_type() == at::kByte, op, ": weight has dtype ", weight.scalar_type(),
              "; expected uint8 (the GGUF blocks as stored in the file)");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [R, row_bytes], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight (shape ", weight.sizes(), ", strides ",
              weight.strides(), ") must be contiguous");
  const at::ScalarType dt = out.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": out has dtype ",
              dt, "; expected float32, float16 or bfloat16");
  TORCH_CHECK(out.dim() == 2, op, ": out must be 2-d [R, K], got shape ", out.sizes());
  GgufDequantDims d{weight.size(0), out.size(1), f};
  TORCH_CHECK(out.size(0) == d.r, op, ": out has shape ", out.sizes(), "; expected [", d.r,
              ", K] (R = weight's first dim)");
  TORCH_CHECK(d.k % f->block_elems == 0, op, ": out has K = ", d.k, " columns, which is not a ",
              "multiple of the ", f->name, " block size ", f->block_elems);
  const int64_t row_bytes = d.k / f->block_elems * f->block_bytes;
  TORCH_CHECK(weight.size(1) == row_bytes, op, ": weight has shape ", weight.sizes(),
              "; expected [R, ", row_bytes, "] (K = ", d.k, " is ", d.k / f->block_elems, " ",
              f->name, " blocks of ", f->block_bytes, " bytes)");
  TORCH_CHECK(out.stride(1) == 1 || d.k <= 1, op, ": out (strides ", out.strides(),
              ") must be contiguous in its last dim");
  if (d.r == 0 || d.k == 0) return d;
  const at::MemOverlapStatus s = at::get_overlap_status(out, weight);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, op,
              ": out overlaps weight in memory; out must be a separate buffer");
  return d;
}

}  // namespace sagellm::checks
