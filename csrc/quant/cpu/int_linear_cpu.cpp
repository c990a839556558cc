// CPU kernels of int8_linear (W8A16, per-channel scales) and int4_linear (W4A16, group scales and
// optional zero points): dequantize a tile of kRowTile weight rows to fp32, then dot every input
// row with them in fp32, tiles spread over torch's thread pool. Inputs of any float dtype are
// converted to fp32 once per call; the result is rounded once to out's dtype after the bias.
//
// It is the portable path (CI, the models' CPU tests, the reference the CUDA kernel is compared
// with on the device): plain C++ vectorised by the compiler (omp simd), no ISA dispatch. The
// weight is read once per call and each input row once per tile, so at decode sizes it is bound
// by the weight bytes (1 or 0.5 per element), at prefill sizes by the fp32 FMAs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "quant/int_linear_checks.h"

namespace sagellm {
namespace {

// Weight rows dequantized together: each input row is read once per tile from cache.
constexpr int64_t kRowTile = 8;
// A task should do about this much work (weight bytes + multiply-adds / 4): less and waking a
// second thread costs more than it saves.
constexpr int64_t kMinWorkPerTask = 256 * 1024;

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              "; this implementation needs CPU tensors");
}

float dot(const float* a, const float* b, int64_t k) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < k; ++i) s += a[i] * b[i];
  return s;
}

// out [M, N] = input [M, K] @ W^T (+ bias), W's row r produced into a K-float buffer by
// dequant_row(r, dst).
template <typename DequantRow>
void int_linear_rows(at::Tensor& out, const at::Tensor& input,
                     const std::optional<at::Tensor>& bias, int64_t n, int64_t row_bytes,
                     const DequantRow& dequant_row) {
  const int64_t m = input.size(0), k = input.size(1);
  const at::Tensor x = input.to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  // fp32 out is written in place (row stride as given); other dtypes through an fp32 buffer.
  const bool direct = out.scalar_type() == at::kFloat;
  at::Tensor y = direct ? out : at::empty({m, n}, out.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int64_t ldy = direct ? out.stride(0) : n;

  const int64_t tiles = (n + kRowTile - 1) / kRowTile;
  const int64_t tile_work = kRowTile * (row_bytes + m * k / 4 + 1);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / tile_work);
  at::parallel_for(0, tiles, grain, [&](int64_t tb, int64_t te) {
    std::vector<float> w(static_cast<size_t>(kRowTile * k));
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t r0 = tile * kRowTile;
      const int64_t rows = std::min(kRowTile, n - r0);
      for (int64_t r = 0; r < rows; ++r) dequant_row(r0 + r, w.data() + r * k);
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = xp + i * k;
        for (int64_t r = 0; r < rows; ++r) {
          const float s = dot(xi, w.data() + r * k, k);
          yp[i * ldy + r0 + r] = bp != nullptr ? s + bp[r0 + r] : s;
        }
      }
    }
  });
  if (!direct) out.copy_(y);
}

}  // namespace

void int8_linear_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const at::Tensor& scales, std::optional<at::Tensor> bias) {
  constexpr const char* op = "int8_linear";
  check_cpu(op, input, "input");
  check_cpu(op, weight, "weight");
  check_cpu(op, scales, "scales");
  check_cpu(op, out, "out");
  if (bias.has_value()) check_cpu(op, *bias, "bias");
  const checks::IntLinearDims d = checks::check_int8_linear(out, input, weight, scales, bias);
  if (d.m == 0 || d.n == 0) return;
  const int8_t* q = weight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  const int64_t k = d.k;
  int_linear_rows(out, input, bias, d.n, k, [&](int64_t r, float* dst) {
    const int8_t* row = q + r * k;
    const float sr = s[r];
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<float>(row[i]) * sr;
  });
}

void int4_linear_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const at::Tensor& scales, std::optional<at::Tensor> zeros,
                     int64_t group_size, std::optional<at::Tensor> bias) {
  constexpr const char* op = "int4_linear";
  check_cpu(op, input, "input");
  check_cpu(op, weight, "weight");
  check_cpu(op, scales, "scales");
  check_cpu(op, out, "out");
  if (zeros.has_value()) check_cpu(op, *zeros, "zeros");
  if (bias.has_value()) check_cpu(op, *bias, "bias");
  const checks::IntLinearDims d =
      checks::check_int4_linear(out, input, weight, scales, zeros, group_size, bias);
  if (zeros.has_value()) checks::check_int4_zero_values(*zeros);
  if (d.m == 0 || d.n == 0) return;
  const uint8_t* q = weight.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const uint8_t* z = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  const int64_t k = d.k, groups = d.k / group_size, half = group_size / 2;
  int_linear_rows(out, input, bias, d.n, k / 2, [&](int64_t r, float* dst) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* bytes = q + r * (k / 2) + g * half;
      const float sg = s[r * groups + g];
      const float zg = z != nullptr ? static_cast<float>(z[r * groups + g]) : 8.f;
      float* o = dst + g * group_size;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        o[2 * j] = (static_cast<float>(bytes[j] & 15) - zg) * sg;
        o[2 * j + 1] = (static_cast<float>(bytes[j] >> 4) - zg) * sg;
      }
    }
  });
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("int8_linear", &sagellm::int8_linear_cpu);
  m.impl("int4_linear", &sagellm::int4_linear_cpu);
}
