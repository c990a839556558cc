// Quantized KV caches: which storage a cache uses and the checks of its per-token scales, shared
// by the attention ops (attention/attention_checks.h) and the cache-write op
// (kv_cache/cache_checks.h) on every device, so all of them accept the same calls and reject bad
// ones with the same messages.
//
// A quantized cache stores int8 or float8_e4m3fn values in the usual
// [num_blocks, block_size, num_kv_heads, head_size] layout plus fp32 scales
// [num_blocks, block_size, num_kv_heads], one per cached (token, KV head); the stored value times
// its scale is the key/value. The model dtype (query, key, value, out) stays fp32/fp16/bf16.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>

namespace sagellm {

enum class KVQuant { kNone, kInt8, kFp8E4M3 };

// Largest stored magnitude: a row's scale is max|x| / kv_quant_max so its largest element maps
// to it. 448 is e4m3fn's largest finite value.
inline constexpr float kKVQuantMaxInt8 = 127.0f;
inline constexpr float kKVQuantMaxFp8E4M3 = 448.0f;

inline KVQuant kv_quant_of(at::ScalarType t) {
  if (t == at::kChar) return KVQuant::kInt8;
  if (t == at::kFloat8_e4m3fn) return KVQuant::kFp8E4M3;
  return KVQuant::kNone;
}

inline float kv_quant_max(KVQuant q) {
  return q == KVQuant::kInt8 ? kKVQuantMaxInt8 : kKVQuantMaxFp8E4M3;
}

// The cache's storage against the model dtype and the scales: both caches share one dtype; a
// quantized cache needs both scales (fp32, contiguous, [num_blocks, block_size, num_kv_heads],
// on the cache's device); an unquantized one has the model dtype and takes no scales.
// key_cache/value_cache shapes are checked by the caller (before or after this).
inline KVQuant check_kv_cache_scales(const char* op, at::ScalarType model_dtype,
                                     const at::Tensor& key_cache, const at::Tensor& value_cache,
                                     const std::optional<at::Tensor>& k_scales,
                                     const std::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op, ": value_cache has dtype ",
              value_cache.scalar_type(), " but key_cache has dtype ", key_cache.scalar_type());
  const KVQuant q = kv_quant_of(key_cache.scalar_type());
  if (q == KVQuant::kNone) {
    TORCH_CHECK(!k_scales.has_value() && !v_scales.has_value(), op,
                ": k_scales/v_scales are only taken with an int8 or float8_e4m3fn cache, but "
                "key_cache has dtype ",
                key_cache.scalar_type());
    return q;
  }
  TORCH_CHECK(model_dtype == at::kFloat || model_dtype == at::kHalf ||
                  model_dtype == at::kBFloat16,
              op, ": a quantized (", key_cache.scalar_type(),
              ") cache needs float32, float16 or bfloat16 keys/queries, got ", model_dtype);
  TORCH_CHECK(k_scales.has_value() && v_scales.has_value(), op, ": key_cache has dtype ",
              key_cache.scalar_type(), " (quantized), so k_scales and v_scales are required; got ",
              k_scales.has_value() ? "k_scales" : "no k_scales", " and ",
              v_scales.has_value() ? "v_scales" : "no v_scales");
  TORCH_CHECK(key_cache.dim() == 4, op,
              ": key_cache must be [num_blocks, block_size, num_kv_heads, head_size], got ",
              key_cache.sizes());
  const std::array<int64_t, 3> want{key_cache.size(0), key_cache.size(1), key_cache.size(2)};
  auto check_one = [&](const at::Tensor& s, const char* name) {
    TORCH_CHECK(s.device() == key_cache.device(), op, ": ", name, " is on ", s.device(),
                " but key_cache is on ", key_cache.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " has dtype ", s.scalar_type(),
                "; expected float32");
    TORCH_CHECK(s.sizes() == at::IntArrayRef(want), op, ": ", name, " has shape ", s.sizes(),
                "; expected [num_blocks, block_size, num_kv_heads] = ", at::IntArrayRef(want));
    TORCH_CHECK(s.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  check_one(*k_scales, "k_scales");
  check_one(*v_scales, "v_scales");
  return q;
}

}  // namespace sagellm
