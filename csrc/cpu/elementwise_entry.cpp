// CPU entry points of the fused small ops: validate the tensors (common/elementwise_checks.h,
// shared with the CUDA entry), describe their rows to the kernels (cpu/elementwise_kernels.h),
// split the rows over torch's thread pool and dispatch to the active ISA. Instantiations (in the
// kernel file): fp32, fp16, bf16 for every op; rotary also takes an fp32 cos/sin cache with
// fp16/bf16 activations (five combinations in all).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "common/elementwise_checks.h"
#include "cpu/dtype.h"
#include "cpu/elementwise_kernels.h"
#include "ops.h"

namespace sagellm {
namespace {

using cpu::RowLayout;

// These ops move a few bytes per element, so a task below ~32K elements costs more in thread
// wake-up than it saves; small inputs run on the calling thread.
constexpr int64_t kMinElementsPerTask = 1 << 15;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, elements_per_item));
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              "; this implementation needs CPU tensors");
}

RowLayout to_layout(const checks::Rows& r) {
  return RowLayout{r.inner, r.outer_stride, r.inner_stride};
}

void gated_act(const char* op, at::Tensor& out, const at::Tensor& input_arg, cpu::GatedAct act) {
  check_cpu(input_arg, op, "input");
  check_cpu(out, op, "out");
  const int64_t d = checks::check_gated_act(op, out, input_arg);
  if (out.numel() == 0) return;
  at::Tensor input = input_arg;
  cpu::GatedActParams p;
  p.dtype = cpu::kernel_dtype(input_arg, op, "input");
  p.act = act;
  p.out = out.data_ptr();
  p.out_rows = to_layout(checks::output_rows(out, op, "out"));
  p.input_rows = to_layout(checks::input_rows(input));
  p.input = input.data_ptr();
  p.d = d;
  const int64_t rows = out.numel() / p.d;
  at::parallel_for(0, rows, grain_for(3 * p.d), [&](int64_t begin, int64_t end) {
    SAGELLM_CPU_DISPATCH(gated_act_kernel, p, begin, end);
  });
}

}  // namespace

void rms_norm_cpu(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
                  double epsilon) {
  const char* op = "rms_norm";
  check_cpu(input_arg, op, "input");
  check_cpu(weight, op, "weight");
  check_cpu(out, op, "out");
  checks::check_rms_norm(out, input_arg, weight, epsilon);
  if (out.numel() == 0) return;
  at::Tensor input = input_arg;
  cpu::RmsNormParams p;
  p.dtype = cpu::kernel_dtype(input, op, "input");
  p.out = out.data_ptr();
  p.out_rows = to_layout(checks::output_rows(out, op, "out"));
  p.input_rows = to_layout(checks::input_rows(input));
  p.input = input.data_ptr();
  p.weight = weight.data_ptr();
  p.hidden = input.size(-1);
  p.eps = static_cast<float>(epsilon);
  const int64_t rows = input.numel() / p.hidden;
  at::parallel_for(0, rows, grain_for(2 * p.hidden), [&](int64_t begin, int64_t end) {
    SAGELLM_CPU_DISPATCH(rms_norm_kernel, p, begin, end);
  });
}

void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                            double epsilon) {
  const char* op = "fused_add_rms_norm";
  check_cpu(input, op, "input");
  check_cpu(weight, op, "weight");
  check_cpu(residual, op, "residual");
  checks::check_fused_add_rms_norm(input, residual, weight, epsilon);
  if (input.numel() == 0) return;
  cpu::FusedAddRmsNormParams p;
  p.dtype = cpu::kernel_dtype(input, op, "input");
  p.input = input.data_ptr();
  p.input_rows = to_layout(checks::output_rows(input, op, "input"));
  p.residual = residual.data_ptr();
  p.residual_rows = to_layout(checks::output_rows(residual, op, "residual"));
  p.weight = weight.data_ptr();
  p.hidden = input.size(-1);
  p.eps = static_cast<float>(epsilon);
  const int64_t rows = input.numel() / p.hidden;
  at::parallel_for(0, rows, grain_for(4 * p.hidden), [&](int64_t begin, int64_t end) {
    SAGELLM_CPU_DISPATCH(fused_add_rms_norm_kernel, p, begin, end);
  });
}

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query,
                          std::optional<at::Tensor> key, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox) {
  const char* op = "rotary_embedding";
  check_cpu(positions, op, "positions");
  check_cpu(query, op, "query");
  check_cpu(cos_sin_cache, op, "cos_sin_cache");
  if (key.has_value()) check_cpu(*key, op, "key");
  const checks::RotaryGeometry g =
      checks::check_rotary(positions, query, key, head_size, cos_sin_cache);
  if (g.num_tokens == 0) return;
  checks::check_positions(positions.data_ptr<int64_t>(), g.num_tokens, cos_sin_cache.size(0));

  cpu::RotaryParams p;
  p.dtype = cpu::kernel_dtype(query, op, "query");
  p.cache_dtype = cpu::kernel_dtype(cos_sin_cache, op, "cos_sin_cache");
  p.positions = positions.data_ptr<int64_t>();
  p.query = query.data_ptr();
  p.query_token_stride = g.query.token_stride;
  p.query_head_stride = g.query.head_stride;
  p.num_query_heads = g.query.heads;
  p.key = key.has_value() ? key->data_ptr() : nullptr;
  p.key_token_stride = g.key.token_stride;
  p.key_head_stride = g.key.head_stride;
  p.num_key_heads = g.key.heads;
  p.rot_dim = g.rot_dim;
  p.cos_sin_cache = cos_sin_cache.data_ptr();
  p.cache_stride = g.cache_stride;
  p.is_neox = is_neox;
  const int64_t per_token = 2 * g.rot_dim * (p.num_query_heads + p.num_key_heads);
  at::parallel_for(0, g.num_tokens, grain_for(per_token), [&](int64_t begin, int64_t end) {
    SAGELLM_CPU_DISPATCH(rotary_embedding_kernel, p, begin, end);
  });
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  gated_act("silu_and_mul", out, input, cpu::GatedAct::kSilu);
}

void gelu_and_mul_cpu(at::Tensor& out, const at::Tensor& input, c10::string_view approximate) {
  const bool tanh = checks::gelu_uses_tanh(approximate);
  gated_act("gelu_and_mul", out, input,
            tanh ? cpu::GatedAct::kGeluTanh : cpu::GatedAct::kGeluErf);
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("rms_norm", &sagellm::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &sagellm::fused_add_rms_norm_cpu);
  m.impl("rotary_embedding", &sagellm::rotary_embedding_cpu);
  m.impl("silu_and_mul", &sagellm::silu_and_mul_cpu);
  m.impl("gelu_and_mul", &sagellm::gelu_and_mul_cpu);
}
