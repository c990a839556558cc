// Parameters of the fused small CPU ops (RMSNorm, rotary embedding, gated activations), shared by
// the ISA kernel file (elementwise_kernels.cpp, compiled once per ISA) and the entry file
// (elementwise_entry.cpp, which validates tensors and fills these structs).
//
// Plain data only: no member functions, so no inline code compiled with AVX-512 flags can be
// picked by the linker for the module side. Strides and sizes are in elements, not bytes.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/types.h"

namespace sagellm::cpu {

// Rows of a [..., hidden] tensor whose innermost dim is contiguous and whose leading dims collapse
// to at most two levels, e.g. a per-head view [tokens, heads, head_dim] sliced out of a fused qkv
// buffer. Row r starts at (r / inner) * outer_stride + (r % inner) * inner_stride.
struct RowLayout {
  int64_t inner;
  int64_t outer_stride;
  int64_t inner_stride;
};

// out[r] = round(round(x[r] * rsqrt(mean(x[r]^2) + eps)) * weight): HF LlamaRMSNorm's rounding.
struct RmsNormParams {
  DType dtype;
  void* out;
  RowLayout out_rows;
  const void* input;
  RowLayout input_rows;
  const void* weight;  // [hidden], contiguous
  int64_t hidden;
  float eps;
};

// residual[r] = round(input[r] + residual[r]); input[r] = rms_norm(residual[r]) * weight.
struct FusedAddRmsNormParams {
  DType dtype;
  void* input;
  RowLayout input_rows;
  void* residual;
  RowLayout residual_rows;
  const void* weight;
  int64_t hidden;
  float eps;
};

// One token's query heads (and key heads, when key != nullptr) rotated in place by the cos/sin
// row at positions[token]. NeoX pairs (i, i + rot_dim/2); GPT-J pairs (2i, 2i + 1).
struct RotaryParams {
  DType dtype;        // of query and key
  DType cache_dtype;  // of cos_sin_cache: kF32 or dtype
  const int64_t* positions;
  void* query;
  int64_t query_token_stride;
  int64_t query_head_stride;
  int64_t num_query_heads;
  void* key;  // nullptr: rotate the query only
  int64_t key_token_stride;
  int64_t key_head_stride;
  int64_t num_key_heads;
  int64_t rot_dim;  // even, <= head_size; only the first rot_dim dims of a head rotate
  const void* cos_sin_cache;  // [max_position, rot_dim]: cos then sin
  int64_t cache_stride;
  bool is_neox;
};

enum class GatedAct : int { kSilu = 0, kGeluErf = 1, kGeluTanh = 2 };

// out[r, :d] = round(act(x[r, :d])) * x[r, d:2d], rounded once more to the dtype (HF's order).
struct GatedActParams {
  DType dtype;
  GatedAct act;
  void* out;
  RowLayout out_rows;
  const void* input;
  RowLayout input_rows;
  int64_t d;
};

// Each kernel processes rows (or tokens) [begin, end); the entry file splits the range.
SAGELLM_DECLARE_PER_ISA(void rms_norm_kernel(const RmsNormParams& p, int64_t begin, int64_t end))
SAGELLM_DECLARE_PER_ISA(void fused_add_rms_norm_kernel(const FusedAddRmsNormParams& p,
                                                       int64_t begin, int64_t end))
SAGELLM_DECLARE_PER_ISA(void rotary_embedding_kernel(const RotaryParams& p, int64_t begin,
                                                     int64_t end))
SAGELLM_DECLARE_PER_ISA(void gated_act_kernel(const GatedActParams& p, int64_t begin, int64_t end))

}  // namespace sagellm::cpu
