// CPU entry of gguf_dequantize: rows of GGUF blocks -> fp32 / fp16 / bf16, with the decoders the
// CUDA kernels run (quant/gguf_decode_parts.h), so the CPU tests check the GPU's arithmetic too.
// Values are bit for bit gguf.quants.dequantize's (then rounded to nearest-even for fp16/bf16).
// Built for an embedding lookup (a few rows per step): plain scalar code, rows split over
// torch's thread pool when there are many.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "quant/gguf_decode_parts.h"
#include "quant/gguf_dequant_checks.h"

namespace sagellm {
namespace {

constexpr const char* kOp = "gguf_dequantize";
// Elements per task: below this, waking a second thread costs more than it saves.
constexpr int64_t kMinElemsPerTask = 64 * 1024;

template <class F, typename T>
void dequantize_rows(const uint8_t* weight, int64_t row_bytes, int64_t k, T* out,
                     int64_t out_stride, int64_t r0, int64_t r1) {
  const int64_t blocks = k / F::kElems;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = weight + r * row_bytes;
    T* o = out + r * out_stride;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = row + b * F::kBytes;
      T* ob = o + b * F::kElems;
      for (int p = 0; p < F::kParts; ++p) {
        float w[8];
        int e0, e1;
        F::template decode<2>(blk, p, w, e0, e1);  // the host reads any alignment
        for (int j = 0; j < 4; ++j) {
          ob[e0 + j] = static_cast<T>(w[j]);
          ob[e1 + j] = static_cast<T>(w[4 + j]);
        }
      }
    }
  }
}

template <typename T>
void dequantize_as(at::Tensor& out, const at::Tensor& weight, int64_t qtype, int64_t r,
                   int64_t k) {
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int64_t row_bytes = weight.size(1), out_stride = out.stride(0);
  T* o = out.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / k);
  gguf_parts::visit_format(qtype, [&](auto format) {
    using F = decltype(format);
    at::parallel_for(0, r, grain, [&](int64_t b, int64_t e) {
      dequantize_rows<F, T>(w, row_bytes, k, o, out_stride, b, e);
    });
  });
}

}  // namespace

void gguf_dequantize_cpu(at::Tensor& out, const at::Tensor& weight, int64_t qtype) {
  TORCH_CHECK(weight.device().is_cpu(), kOp, ": weight is on ", weight.device(),
              "; this implementation needs CPU tensors");
  TORCH_CHECK(out.device().is_cpu(), kOp, ": out is on ", out.device(),
              "; this implementation needs CPU tensors");
  const checks::GgufDequantDims d = checks::check_gguf_dequantize(out, weight, qtype);
  if (d.r == 0 || d.k == 0) return;
  switch (out.scalar_type()) {
    case at::kFloat:
      return dequantize_as<float>(out, weight, qtype, d.r, d.k);
    case at::kHalf:
      return dequantize_as<c10::Half>(out, weight, qtype, d.r, d.k);
    default:
      return dequantize_as<c10::BFloat16>(out, weight, qtype, d.r, d.k);
  }
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("gguf_dequantize", &sagellm::gguf_dequantize_cpu); }
