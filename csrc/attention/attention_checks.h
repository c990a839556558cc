// Input validation shared by the CPU and CUDA entry points of paged_attention_decode and
// paged_attention_prefill, so both devices accept the same inputs and reject bad ones with the
// same messages. Only the device rule differs (the caller passes it in).
//
// Two kinds of checks:
//   * shapes, dtypes, strides, scalars: host metadata, always checked on every device;
//   * index values (seq_lens, block ids, query_start_loc): they need the int32 tensors in host
//     memory (contiguous). The CPU entry always runs them; the CUDA entry copies the indices to
//     the host and runs them only when index checks are on (common/index_checks.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>

#include "common/kv_quant.h"

namespace sagellm::attention {

using sagellm::KVQuant;

// Head sizes with a compiled kernel on every device.
inline constexpr int kHeadSizes[] = {64, 80, 96, 128, 256};

// What the checks learn about a valid call.
struct AttentionDims {
  int head_size;
  int num_heads;
  int num_kv_heads;
  int block_size;
  int64_t num_blocks;
  int64_t num_seqs;
  int64_t sliding_window;  // INT32_MAX when off, else >= 1
};

// The dtypes every kernel takes; anything else names the op and the argument.
inline void check_attention_dtype(const at::Tensor& query) {
  const auto t = query.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "paged_attention: query has dtype ", t, "; expected float32, float16 or bfloat16");
}

// `check_device(tensor, name)` raises when the tensor is on the wrong device.
template <class CheckDevice>
void check_index_tensor(const at::Tensor& t, const char* name, int64_t dim,
                        const CheckDevice& check_device) {
  check_device(t, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// Checks shared by both ops (everything but the per-op token count and query_start_loc).
template <class CheckDevice>
AttentionDims check_attention_inputs(const at::Tensor& out, const at::Tensor& query,
                                     const at::Tensor& key_cache, const at::Tensor& value_cache,
                                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                     double scale, int64_t sliding_window, double soft_cap,
                                     const CheckDevice& check_device) {
  check_device(out, "out");
  check_device(query, "query");
  check_device(key_cache, "key_cache");
  check_device(value_cache, "value_cache");
  check_index_tensor(block_tables, "block_tables", 2, check_device);
  check_index_tensor(seq_lens, "seq_lens", 1, check_device);

  TORCH_CHECK(query.dim() == 3, "query must be 3-D [num_tokens, num_heads, head_size], got shape ",
              query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the shape of query ", query.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(key_cache.dim() == 4,
              "key_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_size], got shape ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of ",
              "key_cache ", key_cache.sizes(), ", got ", value_cache.sizes());
  check_attention_dtype(query);
  auto check_same_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have the dtype of query (",
                query.scalar_type(), "), got ", t.scalar_type());
  };
  check_same_dtype(out, "out");
  // A quantized cache (int8 / float8_e4m3fn) differs from query; check_kv_scales pairs it with
  // its scales. Every entry calls both checks.
  if (kv_quant_of(key_cache.scalar_type()) == KVQuant::kNone) {
    check_same_dtype(key_cache, "key_cache");
    check_same_dtype(value_cache, "value_cache");
  } else {
    TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), "value_cache has dtype ",
                value_cache.scalar_type(), " but key_cache has dtype ", key_cache.scalar_type());
  }
  TORCH_CHECK(key_cache.is_contiguous(), "key_cache must be contiguous");
  TORCH_CHECK(value_cache.is_contiguous(), "value_cache must be contiguous");
  TORCH_CHECK(query.stride(2) == 1, "query must have a contiguous head_size dim (stride(2) == 1), ",
              "got strides ", query.strides());
  TORCH_CHECK(out.stride(2) == 1, "out must have a contiguous head_size dim (stride(2) == 1), ",
              "got strides ", out.strides());

  const int64_t head_size = query.size(2);
  TORCH_CHECK(key_cache.size(3) == head_size, "key_cache head_size ", key_cache.size(3),
              " does not match query head_size ", head_size);
  TORCH_CHECK(std::find(std::begin(kHeadSizes), std::end(kHeadSizes), head_size) !=
                  std::end(kHeadSizes),
              "head_size ", head_size, " is not supported; supported: 64, 80, 96, 128, 256");
  const int64_t num_heads = query.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  TORCH_CHECK(num_kv_heads >= 1 && num_heads >= 1 && num_heads % num_kv_heads == 0,
              "num_heads (query.size(1) = ", num_heads,
              ") must be a positive multiple of num_kv_heads (key_cache.size(2) = ", num_kv_heads,
              ")");
  TORCH_CHECK(key_cache.size(1) >= 1, "key_cache block_size must be >= 1, got ",
              key_cache.size(1));
  TORCH_CHECK(key_cache.size(0) <= std::numeric_limits<int32_t>::max(),
              "key_cache has too many blocks for int32 block ids: ", key_cache.size(0));
  TORCH_CHECK(block_tables.size(0) == seq_lens.size(0), "block_tables has ",
              block_tables.size(0), " rows but seq_lens has ", seq_lens.size(0), " sequences");
  TORCH_CHECK(sliding_window == -1 || sliding_window >= 1,
              "sliding_window must be -1 (off) or >= 1, got ", sliding_window);
  TORCH_CHECK(std::isfinite(soft_cap) && soft_cap >= 0.0,
              "soft_cap must be >= 0 (0 = off), got ", soft_cap);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);

  AttentionDims d{};
  d.head_size = static_cast<int>(head_size);
  d.num_heads = static_cast<int>(num_heads);
  d.num_kv_heads = static_cast<int>(num_kv_heads);
  d.block_size = static_cast<int>(key_cache.size(1));
  d.num_blocks = key_cache.size(0);
  d.num_seqs = seq_lens.size(0);
  // A window longer than any int32 sequence is the same as no window.
  d.sliding_window = sliding_window < 0
                         ? std::numeric_limits<int32_t>::max()
                         : std::min<int64_t>(sliding_window, std::numeric_limits<int32_t>::max());
  return d;
}

// The KV storage of a call: kNone (the cache has query's dtype, no scales) or a quantized cache
// with both k_scales and v_scales fp32 [num_blocks, block_size, num_kv_heads], contiguous, on
// the cache's device (common/kv_quant.h). `op` names the op in the messages.
inline KVQuant check_kv_scales(const char* op, const at::Tensor& query,
                               const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const std::optional<at::Tensor>& k_scales,
                               const std::optional<at::Tensor>& v_scales) {
  return check_kv_cache_scales(op, query.scalar_type(), key_cache, value_cache, k_scales,
                               v_scales);
}

// Decode: one query token per sequence.
inline void check_decode_tokens(const at::Tensor& query, const at::Tensor& seq_lens) {
  TORCH_CHECK(query.size(0) == seq_lens.size(0), "query has ", query.size(0),
              " tokens but seq_lens has ", seq_lens.size(0), " sequences (decode: one token each)");
}

// Prefill: query_start_loc's metadata (its values come in check_query_start_loc).
template <class CheckDevice>
void check_prefill_query_start_loc(const at::Tensor& query_start_loc, const at::Tensor& query,
                                   const at::Tensor& seq_lens, const CheckDevice& check_device) {
  check_index_tensor(query_start_loc, "query_start_loc", 1, check_device);
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1, "query_start_loc must have num_seqs + 1 = ",
              num_seqs + 1, " entries, got ", query_start_loc.size(0));
  TORCH_CHECK(query.size(0) <= std::numeric_limits<int32_t>::max(), "query has too many tokens: ",
              query.size(0));
}

// ---- index values (host memory, contiguous int32) ---------------------------------------------

// seq_lens against the cache size, and every block id a sequence uses against num_blocks.
inline void check_seq_lens_and_blocks(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                      int64_t num_blocks, int64_t block_size, int64_t min_len) {
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_tables.data_ptr<int32_t>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(lens[s] >= min_len, "seq_lens[", s, "] = ", lens[s], " must be >= ", min_len);
    TORCH_CHECK(lens[s] <= max_blocks * block_size, "seq_lens[", s, "] = ", lens[s],
                " exceeds the block table's capacity of ", max_blocks, " blocks x ", block_size,
                " tokens");
    const int64_t used = (lens[s] + block_size - 1) / block_size;
    for (int64_t b = 0; b < used; ++b) {
      const int32_t id = table[s * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", s, ", ", b, "] = ", id,
                  " is out of range [0, ", num_blocks, ")");
    }
  }
}

// query_start_loc: starts at 0, nondecreasing, each sequence's new tokens fit its seq_len, ends
// at the number of query rows.
inline void check_query_start_loc(const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                  int64_t num_tokens) {
  const int64_t num_seqs = seq_lens.size(0);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0, "query_start_loc[0] must be 0, got ", qsl[0]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(qsl[s + 1] >= qsl[s], "query_start_loc must be nondecreasing, got ",
                "query_start_loc[", s, "] = ", qsl[s], " > query_start_loc[", s + 1,
                "] = ", qsl[s + 1]);
    const int64_t q_len = int64_t{qsl[s + 1]} - qsl[s];
    TORCH_CHECK(q_len <= lens[s], "sequence ", s, " has ", q_len,
                " new tokens (query_start_loc) but seq_lens[", s, "] = ", lens[s]);
  }
  TORCH_CHECK(qsl[num_seqs] == num_tokens, "query_start_loc[", num_seqs, "] = ", qsl[num_seqs],
              " must equal the number of query tokens ", num_tokens);
}

}  // namespace sagellm::attention
