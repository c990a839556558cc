// Argument checks of the KV-cache ops (reshape_and_cache, copy_blocks, swap_blocks), shared by
// the CPU entry (cache_ops_cpu.cpp) and the CUDA entry (cache_ops_cuda.cu) so both reject the
// same inputs with the same messages.
//
// Device placement is checked by each entry itself; everything here looks at dtypes, shapes and
// strides, and (the *_values functions) at index values already in host memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/kv_quant.h"

namespace sagellm::checks {

using sagellm::KVQuant;

// ---- reshape_and_cache ------------------------------------------------------------------------

inline void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                    const at::Tensor& key_cache, const at::Tensor& value_cache,
                                    const at::Tensor& slot_mapping) {
  const char* op = "reshape_and_cache";
  TORCH_CHECK(key.dim() == 3, op, ": key must be [num_tokens, num_kv_heads, head_size], got ",
              key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value has shape ", value.sizes(),
              " but key has shape ", key.sizes());
  TORCH_CHECK(key_cache.dim() == 4, op,
              ": key_cache must be [num_blocks, block_size, num_kv_heads, head_size], got ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache has shape ",
              value_cache.sizes(), " but key_cache has shape ", key_cache.sizes());
  TORCH_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2), op,
              ": key has [num_kv_heads, head_size] = ", key.sizes().slice(1),
              " but key_cache has ", key_cache.sizes().slice(2));
  auto check_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == key.scalar_type(), op, ": ", name, " has dtype ",
                t.scalar_type(), " but key has dtype ", key.scalar_type());
  };
  check_dtype(value, "value");
  // A quantized cache (int8 / float8_e4m3fn) differs from key; check_cache_scales pairs it with
  // its scales. Every entry calls both checks.
  if (kv_quant_of(key_cache.scalar_type()) == KVQuant::kNone) {
    check_dtype(key_cache, "key_cache");
    check_dtype(value_cache, "value_cache");
  } else {
    TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op,
                ": value_cache has dtype ", value_cache.scalar_type(), " but key_cache has dtype ",
                key_cache.scalar_type());
  }
  TORCH_CHECK(key_cache.is_contiguous(), op, ": key_cache must be contiguous");
  TORCH_CHECK(value_cache.is_contiguous(), op, ": value_cache must be contiguous");
  TORCH_CHECK(key.size(2) <= 1 || key.stride(2) == 1, op,
              ": key must be contiguous in head_size, got strides ", key.strides());
  TORCH_CHECK(value.size(2) <= 1 || value.stride(2) == 1, op,
              ": value must be contiguous in head_size, got strides ", value.strides());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping has dtype ",
              slot_mapping.scalar_type(), "; expected int64");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), op,
              ": slot_mapping has shape ", slot_mapping.sizes(), "; expected [", key.size(0),
              "] (num_tokens)");
  TORCH_CHECK(slot_mapping.is_contiguous(), op, ": slot_mapping must be contiguous");
}

// The cache's storage: kNone (key's dtype, no scales) or quantized with both k_scales and
// v_scales fp32 [num_blocks, block_size, num_kv_heads], contiguous, on the cache's device
// (common/kv_quant.h). A quantized cache takes float32/float16/bfloat16 keys.
inline KVQuant check_cache_scales(const at::Tensor& key, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache,
                                  const std::optional<at::Tensor>& k_scales,
                                  const std::optional<at::Tensor>& v_scales) {
  return check_kv_cache_scales("reshape_and_cache", key.scalar_type(), key_cache, value_cache,
                               k_scales, v_scales);
}

// Serial, so the error names the first bad entry; -1 marks a token that is not cached.
inline void check_slot_values(const int64_t* slots, int64_t n, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slots[i] == -1 || (slots[i] >= 0 && slots[i] < num_slots),
                "reshape_and_cache: slot_mapping[", i, "] = ", slots[i], " is out of range [0, ",
                num_slots, ") (num_blocks * block_size; -1 skips a token)");
  }
}

// ---- block copies -----------------------------------------------------------------------------

// block_mapping int64 [n, 2] of (src, dst) block ids: dtype, shape, contiguity.
inline void check_block_mapping_layout(const at::Tensor& block_mapping, const char* op) {
  TORCH_CHECK(block_mapping.scalar_type() == at::kLong, op, ": block_mapping has dtype ",
              block_mapping.scalar_type(), "; expected int64");
  TORCH_CHECK(block_mapping.dim() == 2 && block_mapping.size(1) == 2, op,
              ": block_mapping must have shape [n, 2] (src, dst), got ", block_mapping.sizes());
  TORCH_CHECK(block_mapping.is_contiguous(), op, ": block_mapping must be contiguous");
}

// m: the n (src, dst) pairs, in host memory.
inline void check_block_mapping_values(const int64_t* m, int64_t n, const char* op,
                                       int64_t src_blocks, int64_t dst_blocks) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(m[2 * i] >= 0 && m[2 * i] < src_blocks, op, ": block_mapping[", i, ", 0] = ",
                m[2 * i], " is out of range [0, ", src_blocks, ")");
    TORCH_CHECK(m[2 * i + 1] >= 0 && m[2 * i + 1] < dst_blocks, op, ": block_mapping[", i,
                ", 1] = ", m[2 * i + 1], " is out of range [0, ", dst_blocks, ")");
  }
}

// A cache tensor [num_blocks, ...] of whole blocks laid out back to back.
inline void check_block_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op,
                               const std::string& name, const std::string& ref_name) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have a leading block dim, got a 0-d tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

inline int64_t block_bytes(const at::Tensor& t) {
  int64_t elems = 1;
  for (int64_t d = 1; d < t.dim(); ++d) elems *= t.size(d);
  return elems * static_cast<int64_t>(t.element_size());
}

// copy_blocks' caches: every layer's key cache, then every layer's value cache, all of
// key_caches[0]'s shape and dtype. check_device(t, name) checks each one's placement first.
template <typename DeviceCheck>
std::vector<at::Tensor> layer_caches(const std::vector<at::Tensor>& key_caches,
                                     const std::vector<at::Tensor>& value_caches,
                                     DeviceCheck&& check_device) {
  const char* op = "copy_blocks";
  TORCH_CHECK(key_caches.size() == value_caches.size(), op, ": ", key_caches.size(),
              " key_caches but ", value_caches.size(),
              " value_caches; expected one of each per layer");
  std::vector<at::Tensor> caches;
  if (key_caches.empty()) return caches;
  const at::Tensor& ref = key_caches[0];
  for (const auto* list : {&key_caches, &value_caches}) {
    const std::string list_name = list == &key_caches ? "key_caches" : "value_caches";
    for (size_t i = 0; i < list->size(); ++i) {
      const at::Tensor& t = (*list)[i];
      const std::string name = list_name + "[" + std::to_string(i) + "]";
      check_device(t, name);
      check_block_tensor(t, ref, op, name, "key_caches[0]");
      TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(),
                  " but key_caches[0] has shape ", ref.sizes());
      caches.push_back(t);
    }
  }
  return caches;
}

// swap_blocks' src and dst: whole blocks of one shape and dtype (the block counts may differ).
inline void check_swap_caches(const at::Tensor& src, const at::Tensor& dst) {
  const char* op = "swap_blocks";
  check_block_tensor(src, src, op, "src", "src");
  check_block_tensor(dst, src, op, "dst", "src");
  TORCH_CHECK(src.sizes().slice(1) == dst.sizes().slice(1), op, ": src has block shape ",
              src.sizes().slice(1), " but dst has ", dst.sizes().slice(1));
}

}  // namespace sagellm::checks
