// CPU entry point of gguf_linear: validate the tensors (quant/cpu/gguf_checks.h), quantize the
// input rows into a scratch buffer, split the weight rows over torch's thread pool and run the
// kernel of the active ISA (quant/cpu/quant_kernels.h). Instantiations (in the kernel files):
// the eight GGUF types of gguf_formats.h (plus corr / min-term variants of the offset types) x
// panels of 1, 2, 4 and kMaxRows input rows; fp32 / bf16 inputs are converted when quantized.
//
// ISA: the AVX-512 kernels use AVX512-VNNI (vpdpbusd). On an AVX-512 CPU without it the AVX2
// kernels run instead, so `cpu_isa() == "avx512"` means "avx512 + VNNI, else avx2" for this op.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/isa.h"
#include "ops.h"
#include "quant/cpu/gguf_checks.h"
#include "quant/cpu/quant_kernels.h"

namespace sagellm {
namespace {

constexpr const char* kOp = "gguf_linear";

// A task should stream about 256 KiB of weight (or do the equivalent arithmetic when several
// input rows share each weight row): less and the thread wake-up costs more than the second
// core saves.
constexpr int64_t kMinWorkPerTask = 256 * 1024;
// One input row of K elements against a weight row costs about as much as streaming 0.3 K
// weight bytes (dev machine, one core, AVX-512: ~110 GFLOP/s at M = 64, i.e. 0.018 ns per
// element and row, vs ~15 GB/s of Q4_1 at M = 1, 0.068 ns per weight byte).
constexpr int64_t kRowCostPer10K = 3;
// Quantizing the input is split over threads only past this many elements.
constexpr int64_t kMinQuantizeElemsPerTask = 64 * 1024;

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " is on ", t.device(),
              "; this implementation needs CPU tensors");
}

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return has;
#else
  return false;
#endif
}

cpu::Isa kernel_isa() {
  const cpu::Isa isa = cpu::active_isa();
  if (isa == cpu::Isa::kAvx512 && !cpu_has_avx512_vnni()) return cpu::Isa::kAvx2;
  return isa;
}

void quantize_activations(cpu::Isa isa, const cpu::GgufLinearParams& p, int64_t b, int64_t e) {
  switch (isa) {
#if defined(SAGELLM_HAVE_ISA_AVX512)
    case cpu::Isa::kAvx512:
      return cpu::avx512::gguf_quantize_activations(p, b, e);
    case cpu::Isa::kAvx2:
      return cpu::avx2::gguf_quantize_activations(p, b, e);
#endif
    default:
      return cpu::scalar::gguf_quantize_activations(p, b, e);
  }
}

void linear_kernel(cpu::Isa isa, const cpu::GgufLinearParams& p, int64_t b, int64_t e) {
  switch (isa) {
#if defined(SAGELLM_HAVE_ISA_AVX512)
    case cpu::Isa::kAvx512:
      return cpu::avx512::gguf_linear_kernel(p, b, e);
    case cpu::Isa::kAvx2:
      return cpu::avx2::gguf_linear_kernel(p, b, e);
#endif
    default:
      return cpu::scalar::gguf_linear_kernel(p, b, e);
  }
}

}  // namespace

void gguf_linear_cpu(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
                     int64_t qtype, std::optional<at::Tensor> bias) {
  check_cpu(input_arg, "input");
  check_cpu(weight, "weight");
  check_cpu(out, "out");
  if (bias.has_value()) check_cpu(*bias, "bias");
  const checks::GgufLinearDims dims =
      checks::check_gguf_linear(out, input_arg, weight, qtype, bias);
  const int64_t m = dims.m, n = dims.n, k = dims.k;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // An empty sum: out = bias (or 0), as F.linear gives.
    if (bias.has_value()) {
      out.copy_(bias->unsqueeze(0).expand({m, n}));
    } else {
      out.zero_();
    }
    return;
  }
  // The kernels read input rows with unit element stride; a layout they cannot read is copied.
  const at::Tensor input = (input_arg.stride(1) == 1) ? input_arg : input_arg.contiguous();

  // Activation scratch (int8 values, scales, sums), a few bytes per input element, kept per
  // calling thread: allocating it per call costs as much as a small decode GEMV. 64 bytes of
  // slack align it, so the kernels' vector loads from it stay within cache lines.
  thread_local std::vector<uint8_t> scratch;
  const size_t scratch_bytes = static_cast<size_t>(cpu::gguf_scratch_bytes(m, k)) + 64;
  if (scratch.size() < scratch_bytes) scratch.resize(scratch_bytes);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(scratch.data());
  void* base = reinterpret_cast<void*>((raw + 63) / 64 * 64);

  cpu::GgufLinearParams p;
  p.qtype = static_cast<int>(qtype);
  p.dtype = input.scalar_type() == at::kFloat ? cpu::DType::kF32 : cpu::DType::kBF16;
  p.input = input.data_ptr();
  p.input_row_stride = input.stride(0);
  p.weight = weight.data_ptr<uint8_t>();
  p.row_bytes = weight.size(1);
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_row_stride = out.stride(0);
  p.m = m;
  p.n = n;
  p.k = k;
  p.act = cpu::gguf_scratch_layout(base, m, k);

  // Read once: both passes must agree on the layout of the scratch, even if another thread
  // switches the ISA meanwhile.
  const cpu::Isa isa = kernel_isa();
  const int64_t q_grain = std::max<int64_t>(1, kMinQuantizeElemsPerTask / k);
  at::parallel_for(0, m, q_grain,
                   [&](int64_t b, int64_t e) { quantize_activations(isa, p, b, e); });

  const int64_t row_cost = p.row_bytes + m * k * kRowCostPer10K / 10;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / row_cost);
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { linear_kernel(isa, p, b, e); });
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("gguf_linear", &sagellm::gguf_linear_cpu); }
