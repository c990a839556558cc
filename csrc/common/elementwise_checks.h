// Argument checks of the fused small ops (RMSNorm, rotary embedding, gated activations), shared
// by the CPU entry (cpu/elementwise_entry.cpp) and the CUDA entry
// (elementwise/cuda/elementwise_cuda.cu) so both reject the same inputs with the same messages.
//
// Device placement is the one thing checked by each entry itself; everything here looks only at
// dtypes, shapes and strides, plus (check_positions) index values already in host memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/dtype.h"

namespace sagellm::checks {

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// The rows of a [..., hidden] tensor (innermost dim contiguous) whose leading dims collapse to
// at most two strided levels: row r starts at (r / inner) * outer_stride + (r % inner) *
// inner_stride elements.
struct Rows {
  int64_t inner;
  int64_t outer_stride;
  int64_t inner_stride;
};

// Merges leading dims laid out back to back; false when more than two levels remain.
inline bool describe_rows(const at::Tensor& t, Rows* out) {
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
    *out = Rows{1, 0, 0};
  } else if (groups.size() == 1) {
    *out = Rows{1, groups[0].second, 0};
  } else {
    *out = Rows{groups[0].first, groups[1].second, groups[0].second};
  }
  return true;
}

// Inputs whose rows cannot be described are copied (on their own device); outputs must be
// written where they are.
inline Rows input_rows(at::Tensor& t) {
  Rows l;
  if (!describe_rows(t, &l)) {
    t = t.contiguous();
    TORCH_INTERNAL_ASSERT(describe_rows(t, &l));
  }
  return l;
}

inline Rows output_rows(const at::Tensor& t, const char* op, const char* name) {
  Rows l;
  TORCH_CHECK(describe_rows(t, &l), op, ": ", name, " (sizes ", t.sizes(), ", strides ",
              t.strides(),
              ") must be contiguous in its last dim with rows at most two strided levels deep");
  return l;
}

// ---- RMSNorm ----------------------------------------------------------------------------------

inline void check_norm_args(const char* op, const at::Tensor& input, const char* input_name,
                            const at::Tensor& weight, double epsilon) {
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

inline void check_rms_norm(const at::Tensor& out, const at::Tensor& input,
                           const at::Tensor& weight, double epsilon) {
  const char* op = "rms_norm";
  check_norm_args(op, input, "input", weight, epsilon);
  check_same_dtype(out, input, op, "out", "input");
  TORCH_CHECK(out.sizes() == input.sizes(), op, ": out has shape ", out.sizes(),
              " but input has shape ", input.sizes());
}

inline void check_fused_add_rms_norm(const at::Tensor& input, const at::Tensor& residual,
                                     const at::Tensor& weight, double epsilon) {
  const char* op = "fused_add_rms_norm";
  check_norm_args(op, input, "input", weight, epsilon);
  check_same_dtype(residual, input, op, "residual", "input");
  TORCH_CHECK(residual.sizes() == input.sizes(), op, ": residual has shape ", residual.sizes(),
              " but input has shape ", input.sizes());
}

// ---- Gated activations ------------------------------------------------------------------------

// gelu_and_mul's `approximate`: false for 'none' (erf), true for 'tanh'.
inline bool gelu_uses_tanh(c10::string_view approximate) {
  if (approximate == "none") return false;
  if (approximate == "tanh") return true;
  TORCH_CHECK(false, "gelu_and_mul: approximate = '", std::string(approximate),
              "'; expected 'none' or 'tanh'");
  return false;  // unreachable
}

// input [..., 2d], out [..., d]; returns d.
inline int64_t check_gated_act(const char* op, const at::Tensor& out, const at::Tensor& input) {
  cpu::kernel_dtype(input, op, "input");
  check_same_dtype(out, input, op, "out", "input");
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dim, got 0");
  const int64_t two_d = input.size(-1);
  TORCH_CHECK(two_d % 2 == 0, op, ": input's last dim is ", two_d, "; it must be even (2 * d)");
  std::vector<int64_t> expected = input.sizes().vec();
  expected.back() = two_d / 2;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": out has shape ", out.sizes(),
              "; expected ", at::IntArrayRef(expected), " for input of shape ", input.sizes());
  return two_d / 2;
}

// ---- Rotary embedding -------------------------------------------------------------------------

// Where the heads of query or key lie: [tokens, heads * head_size] or [tokens, heads,
// head_size], each head contiguous inside. Element strides.
struct HeadLayout {
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  int64_t heads = 0;
};

inline HeadLayout head_layout(const at::Tensor& t, const char* name, int64_t num_tokens,
                              int64_t head_size) {
  const char* op = "rotary_embedding";
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, op, ": ", name, " must be 2-d or 3-d, got shape ",
              t.sizes());
  TORCH_CHECK(t.size(0) == num_tokens, op, ": ", name, " has ", t.size(0),
              " tokens but positions has ", num_tokens);
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dim, got strides ", t.strides());
  HeadLayout l;
  l.token_stride = t.stride(0);
  if (t.dim() == 3) {
    TORCH_CHECK(t.size(2) == head_size, op, ": ", name, " has head size ", t.size(2),
                " but head_size = ", head_size);
    l.heads = t.size(1);
    l.head_stride = t.stride(1);
  } else {
    TORCH_CHECK(t.size(1) % head_size == 0, op, ": ", name, "'s last dim ", t.size(1),
                " is not a multiple of head_size = ", head_size);
    l.heads = t.size(1) / head_size;
    l.head_stride = head_size;
  }
  return l;
}

struct RotaryGeometry {
  int64_t num_tokens;
  int64_t rot_dim;       // even, <= head_size
  int64_t cache_stride;  // elements between rows of cos_sin_cache
  HeadLayout query;
  HeadLayout key;  // heads == 0 without a key
};

// Everything about rotary_embedding's arguments except devices and the position values.
inline RotaryGeometry check_rotary(const at::Tensor& positions, const at::Tensor& query,
                                   const std::optional<at::Tensor>& key, int64_t head_size,
                                   const at::Tensor& cos_sin_cache) {
  const char* op = "rotary_embedding";
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions has dtype ",
              positions.scalar_type(), "; expected int64");
  TORCH_CHECK(positions.dim() == 1, op, ": positions must be 1-d [num_tokens], got shape ",
              positions.sizes());
  TORCH_CHECK(positions.is_contiguous(), op, ": positions must be contiguous");
  cpu::kernel_dtype(query, op, "query");
  TORCH_CHECK(head_size > 0, op, ": head_size = ", head_size, " must be > 0");
  TORCH_CHECK(cos_sin_cache.dim() == 2, op, ": cos_sin_cache must be 2-d [max_position, rot_dim]",
              ", got shape ", cos_sin_cache.sizes());
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat ||
                  cos_sin_cache.scalar_type() == query.scalar_type(),
              op, ": cos_sin_cache has dtype ", cos_sin_cache.scalar_type(),
              "; expected float32 or query's dtype ", query.scalar_type());
  TORCH_CHECK(cos_sin_cache.stride(1) == 1, op,
              ": cos_sin_cache must be contiguous in its last dim");
  RotaryGeometry g;
  g.rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(g.rot_dim > 0 && g.rot_dim % 2 == 0 && g.rot_dim <= head_size, op,
              ": cos_sin_cache's rot_dim = ", g.rot_dim,
              " must be even, > 0 and <= head_size = ", head_size);
  g.num_tokens = positions.size(0);
  g.cache_stride = cos_sin_cache.stride(0);
  g.query = head_layout(query, "query", g.num_tokens, head_size);
  if (key.has_value()) {
    check_same_dtype(*key, query, op, "key", "query");
    g.key = head_layout(*key, "key", g.num_tokens, head_size);
  }
  return g;
}

// Index tensors are small (one entry per token): a serial range check, so the error names the
// first bad entry.
inline void check_positions(const int64_t* pos, int64_t n, int64_t max_position) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < max_position, "rotary_embedding: positions[", i,
                "] = ", pos[i], " is out of range [0, ", max_position,
                ") (the rows of cos_sin_cache)");
  }
}

}  // namespace sagellm::checks
