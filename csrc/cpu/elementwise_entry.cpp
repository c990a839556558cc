// CPU entry points of the fused small ops: validate the tensors, describe their rows to the
// kernels (cpu/elementwise_kernels.h), split the rows over torch's thread pool and dispatch to
// the active ISA. Instantiations (in the kernel file): fp32, fp16, bf16 for every op; rotary also
// takes an fp32 cos/sin cache with fp16/bf16 activations (five combinations in all).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "cpu/elementwise_kernels.h"
#include "cpu/dtype.h"
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

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                      const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// Describe the rows of t ([..., hidden], innermost contiguous) as at most two strided levels,
// merging leading dims that are laid out back to back. False when that is impossible.
bool row_layout(const at::Tensor& t, RowLayout* out) {
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  std::vector<std::pair<int64_t, int64_t>> groups;  // (size, stride), innermost first
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (!groups.empty() && t.stride(d) == groups.back().first * groups.back().second) {
      groups.back().first *= t.size(d);
    } else {
      groups.emplace_back(t.size(d), t.stride(d));
    }
  }
  if (groups.size() > 2) return false;
  if (groups.empty()) {
    *out = RowLayout{1, 0, 0};
  } else if (groups.size() == 1) {
    *out = RowLayout{1, groups[0].second, 0};
  } else {
    *out = RowLayout{groups[0].first, groups[1].second, groups[0].second};
  }
  return true;
}

// Inputs whose rows cannot be described are copied; outputs must be written where they are.
RowLayout input_rows(at::Tensor& t) {
  RowLayout l;
  if (!row_layout(t, &l)) {
    t = t.contiguous();
    TORCH_INTERNAL_ASSERT(row_layout(t, &l));
  }
  return l;
}

RowLayout output_rows(const at::Tensor& t, const char* op, const char* name) {
  RowLayout l;
  TORCH_CHECK(row_layout(t, &l), op, ": ", name, " (sizes ", t.sizes(), ", strides ",
              t.strides(),
              ") must be contiguous in its last dim with rows at most two strided levels deep");
  return l;
}

void check_norm_args(const char* op, const at::Tensor& input, const char* input_name,
                     const at::Tensor& weight, double epsilon) {
  check_cpu(input, op, input_name);
  check_cpu(weight, op, "weight");
  cpu::kernel_dtype(input, op, input_name);
  check_same_dtype(weight, input, op, "weight", input_name);
  TORCH_CHECK(input.dim() >= 1, op, ": ", input_name, " must have at least 1 dim, got 0");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(-1), op, ": weight has shape ",
              weight.sizes(), "; expected [", input.size(-1), "] (the last dim of ", input_name,
              ")");
  TORCH_CHECK(weight.stride(0) == 1 || weight.size(0) <= 1, op, ": weight must be contiguous");
  TORCH_CHECK(std::isfinite(epsilon) && epsilon >= 0.0, op, ": epsilon = ", epsilon,
              " must be finite and >= 0");
}

cpu::GatedAct parse_gelu(c10::string_view approximate) {
  if (approximate == "none") return cpu::GatedAct::kGeluErf;
  if (approximate == "tanh") return cpu::GatedAct::kGeluTanh;
  TORCH_CHECK(false, "gelu_and_mul: approximate = '", std::string(approximate),
              "'; expected 'none' or 'tanh'");
  return cpu::GatedAct::kGeluErf;  // unreachable
}

void gated_act(const char* op, at::Tensor& out, const at::Tensor& input_arg, cpu::GatedAct act) {
  check_cpu(input_arg, op, "input");
  check_cpu(out, op, "out");
  const cpu::DType dtype = cpu::kernel_dtype(input_arg, op, "input");
  check_same_dtype(out, input_arg, op, "out", "input");
  TORCH_CHECK(input_arg.dim() >= 1, op, ": input must have at least 1 dim, got 0");
  const int64_t two_d = input_arg.size(-1);
  TORCH_CHECK(two_d % 2 == 0, op, ": input's last dim is ", two_d, "; it must be even (2 * d)");
  std::vector<int64_t> expected = input_arg.sizes().vec();
  expected.back() = two_d / 2;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": out has shape ", out.sizes(),
              "; expected ", at::IntArrayRef(expected), " for input of shape ", input_arg.sizes());
  if (out.numel() == 0) return;
  at::Tensor input = input_arg;
  cpu::GatedActParams p;
  p.dtype = dtype;
  p.act = act;
  p.out = out.data_ptr();
  p.out_rows = output_rows(out, op, "out");
  p.input_rows = input_rows(input);
  p.input = input.data_ptr();
  p.d = two_d / 2;
  const int64_t rows = out.numel() / p.d;
  at::parallel_for(0, rows, grain_for(3 * p.d), [&](int64_t begin, int64_t end) {
    SAGELLM_CPU_DISPATCH(gated_act_kernel, p, begin, end);
  });
}

// Index tensors are small (one entry per token): a serial range check before the parallel
// kernel, so the error names the first bad entry.
void check_positions(const at::Tensor& positions, int64_t max_position) {
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < positions.numel(); ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < max_position, "rotary_embedding: positions[", i,
                "] = ", pos[i], " is out of range [0, ", max_position,
                ") (the rows of cos_sin_cache)");
  }
}

// (token stride, head stride, heads) of a [tokens, heads * head_size] or
// [tokens, heads, head_size] tensor whose heads are contiguous inside.
void head_layout(const at::Tensor& t, const char* name, int64_t num_tokens, int64_t head_size,
                 int64_t* token_stride, int64_t* head_stride, int64_t* heads) {
  const char* op = "rotary_embedding";
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, op, ": ", name, " must be 2-d or 3-d, got shape ",
              t.sizes());
  TORCH_CHECK(t.size(0) == num_tokens, op, ": ", name, " has ", t.size(0),
              " tokens but positions has ", num_tokens);
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dim, got strides ", t.strides());
  *token_stride = t.stride(0);
  if (t.dim() == 3) {
    TORCH_CHECK(t.size(2) == head_size, op, ": ", name, " has head size ", t.size(2),
                " but head_size = ", head_size);
    *heads = t.size(1);
    *head_stride = t.stride(1);
  } else {
    TORCH_CHECK(t.size(1) % head_size == 0, op, ": ", name, "'s last dim ", t.size(1),
                " is not a multiple of head_size = ", head_size);
    *heads = t.size(1) / head_size;
    *head_stride = head_size;
  }
}

}  // namespace

void rms_norm_cpu(at::Tensor& out, const at::Tensor& input_arg, const at::Tensor& weight,
                  double epsilon) {
  const char* op = "rms_norm";
  check_norm_args(op, input_arg, "input", weight, epsilon);
  check_cpu(out, op, "out");
  check_same_dtype(out, input_arg, op, "out", "input");
  TORCH_CHECK(out.sizes() == input_arg.sizes(), op, ": out has shape ", out.sizes(),
              " but input has shape ", input_arg.sizes());
  if (out.numel() == 0) return;
  at::Tensor input = input_arg;
  cpu::RmsNormParams p;
  p.dtype = cpu::kernel_dtype(input, op, "input");
  p.out = out.data_ptr();
  p.out_rows = output_rows(out, op, "out");
  p.input_rows = input_rows(input);
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
  check_norm_args(op, input, "input", weight, epsilon);
  check_cpu(residual, op, "residual");
  check_same_dtype(residual, input, op, "residual", "input");
  TORCH_CHECK(residual.sizes() == input.sizes(), op, ": residual has shape ", residual.sizes(),
              " but input has shape ", input.sizes());
  if (input.numel() == 0) return;
  cpu::FusedAddRmsNormParams p;
  p.dtype = cpu::kernel_dtype(input, op, "input");
  p.input = input.data_ptr();
  p.input_rows = output_rows(input, op, "input");
  p.residual = residual.data_ptr();
  p.residual_rows = output_rows(residual, op, "residual");
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
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions has dtype ",
              positions.scalar_type(), "; expected int64");
  TORCH_CHECK(positions.dim() == 1, op, ": positions must be 1-d [num_tokens], got shape ",
              positions.sizes());
  TORCH_CHECK(positions.is_contiguous(), op, ": positions must be contiguous");
  const cpu::DType dtype = cpu::kernel_dtype(query, op, "query");
  TORCH_CHECK(head_size > 0, op, ": head_size = ", head_size, " must be > 0");
  TORCH_CHECK(cos_sin_cache.dim() == 2, op, ": cos_sin_cache must be 2-d [max_position, rot_dim]",
              ", got shape ", cos_sin_cache.sizes());
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat ||
                  cos_sin_cache.scalar_type() == query.scalar_type(),
              op, ": cos_sin_cache has dtype ", cos_sin_cache.scalar_type(),
              "; expected float32 or query's dtype ", query.scalar_type());
  TORCH_CHECK(cos_sin_cache.stride(1) == 1, op,
              ": cos_sin_cache must be contiguous in its last dim");
  const int64_t rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_size, op,
              ": cos_sin_cache's rot_dim = ", rot_dim, " must be even, > 0 and <= head_size = ",
              head_size);
  const int64_t num_tokens = positions.size(0);

  cpu::RotaryParams p;
  p.dtype = dtype;
  p.cache_dtype = cpu::kernel_dtype(cos_sin_cache, op, "cos_sin_cache");
  head_layout(query, "query", num_tokens, head_size, &p.query_token_stride, &p.query_head_stride,
              &p.num_query_heads);
  p.query = query.data_ptr();
  p.key = nullptr;
  p.key_token_stride = p.key_head_stride = p.num_key_heads = 0;
  if (key.has_value()) {
    check_cpu(*key, op, "key");
    check_same_dtype(*key, query, op, "key", "query");
    head_layout(*key, "key", num_tokens, head_size, &p.key_token_stride, &p.key_head_stride,
                &p.num_key_heads);
    p.key = key->data_ptr();
  }
  if (num_tokens == 0) return;
  check_positions(positions, cos_sin_cache.size(0));
  p.positions = positions.data_ptr<int64_t>();
  p.rot_dim = rot_dim;
  p.cos_sin_cache = cos_sin_cache.data_ptr();
  p.cache_stride = cos_sin_cache.stride(0);
  p.is_neox = is_neox;
  const int64_t per_token = 2 * rot_dim * (p.num_query_heads + p.num_key_heads);
  at::parallel_for(0, num_tokens, grain_for(per_token), [&](int64_t begin, int64_t end) {
    SAGELLM_CPU_DISPATCH(rotary_embedding_kernel, p, begin, end);
  });
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  gated_act("silu_and_mul", out, input, cpu::GatedAct::kSilu);
}

void gelu_and_mul_cpu(at::Tensor& out, const at::Tensor& input, c10::string_view approximate) {
  gated_act("gelu_and_mul", out, input, parse_gelu(approximate));
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("rms_norm", &sagellm::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &sagellm::fused_add_rms_norm_cpu);
  m.impl("rotary_embedding", &sagellm::rotary_embedding_cpu);
  m.impl("silu_and_mul", &sagellm::silu_and_mul_cpu);
  m.impl("gelu_and_mul", &sagellm::gelu_and_mul_cpu);
}
