// CPU entry points of paged_attention_decode / paged_attention_prefill: validate the tensors,
// plan the work items (tiles of query rows x key ranges, see attention_kernels.h), run them on
// torch's thread pool and, for split-context decode, merge the parts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention/cpu/attention_kernels.h"
#include "cpu/dtype.h"
#include "ops.h"

namespace sagellm {
namespace {

using cpu::AttentionWorkItem;
using cpu::PagedAttentionParams;

// Decode never splits a context into parts shorter than this many keys.
constexpr int64_t kMinPartKeys = 256;
constexpr int64_t kChunkKeys = 32;  // the kernel's key chunk; parts are multiples of it

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

void check_int32(const at::Tensor& t, const char* name, int64_t dim) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// Checks shared by both ops; fills everything in the params but the work items.
PagedAttentionParams check_and_describe(const at::Tensor& out, const at::Tensor& query,
                                        const at::Tensor& key_cache,
                                        const at::Tensor& value_cache,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        double scale, int64_t sliding_window, double soft_cap) {
  check_cpu(out, "out");
  check_cpu(query, "query");
  check_cpu(key_cache, "key_cache");
  check_cpu(value_cache, "value_cache");
  check_int32(block_tables, "block_tables", 2);
  check_int32(seq_lens, "seq_lens", 1);

  TORCH_CHECK(query.dim() == 3, "query must be 3-D [num_tokens, num_heads, head_size], got shape ",
              query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the shape of query ", query.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(key_cache.dim() == 4,
              "key_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_size], got shape ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of ",
              "key_cache ", key_cache.sizes(), ", got ", value_cache.sizes());
  const cpu::DType dtype = cpu::kernel_dtype(query, "paged_attention", "query");
  auto check_same_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have the dtype of query (",
                query.scalar_type(), "), got ", t.scalar_type());
  };
  check_same_dtype(out, "out");
  check_same_dtype(key_cache, "key_cache");
  check_same_dtype(value_cache, "value_cache");
  TORCH_CHECK(key_cache.is_contiguous(), "key_cache must be contiguous");
  TORCH_CHECK(value_cache.is_contiguous(), "value_cache must be contiguous");
  TORCH_CHECK(query.stride(2) == 1, "query must have a contiguous head_size dim (stride(2) == 1), ",
              "got strides ", query.strides());
  TORCH_CHECK(out.stride(2) == 1, "out must have a contiguous head_size dim (stride(2) == 1), ",
              "got strides ", out.strides());

  const int64_t head_size = query.size(2);
  TORCH_CHECK(key_cache.size(3) == head_size, "key_cache head_size ", key_cache.size(3),
              " does not match query head_size ", head_size);
  const auto& sizes = cpu::kAttentionHeadSizes;
  TORCH_CHECK(std::find(std::begin(sizes), std::end(sizes), head_size) != std::end(sizes),
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

  PagedAttentionParams p{};
  p.dtype = dtype;
  p.head_size = static_cast<int>(head_size);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.block_size = static_cast<int>(key_cache.size(1));
  p.query = query.data_ptr();
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.out = out.data_ptr();
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.scale = static_cast<float>(scale);
  p.sliding_window = sliding_window < 0 ? std::numeric_limits<int32_t>::max() : sliding_window;
  p.soft_cap = static_cast<float>(soft_cap);
  return p;
}

// seq_lens against the cache size, and every block id a sequence uses against num_blocks.
void check_seq_lens_and_blocks(const at::Tensor& block_tables, const at::Tensor& seq_lens,
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

// Heads of one GQA group are split into tiles of at most kAttentionMaxRows rows, evenly.
int64_t head_tiles(int64_t group) {
  return (group + cpu::kAttentionMaxRows - 1) / cpu::kAttentionMaxRows;
}

// Runs the items longest first, each thread taking the next one when it is free: ragged batches
// and causal prefill tiles differ a lot in cost, so a static split would leave threads idle.
void run_items(PagedAttentionParams& p, std::vector<AttentionWorkItem>& items) {
  auto cost = [](const AttentionWorkItem& w) {
    return int64_t(w.q_end - w.q_begin) * (w.head_end - w.head_begin) *
           (w.kv_head_end - w.kv_head) *
           (w.key_end - w.key_begin + cpu::kAttentionMaxRows);
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const auto& a, const auto& b) { return cost(a) > cost(b); });
  p.items = items.data();
  const int64_t n = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1))
      SAGELLM_CPU_DISPATCH(paged_attention_run, p, i, i + 1);
  });
}

}  // namespace

void paged_attention_decode_cpu(at::Tensor& out, const at::Tensor& query,
                                const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                double scale, int64_t sliding_window, double soft_cap) {
  PagedAttentionParams p = check_and_describe(out, query, key_cache, value_cache, block_tables,
                                              seq_lens, scale, sliding_window, soft_cap);
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query.size(0) == num_seqs, "query has ", query.size(0),
              " tokens but seq_lens has ", num_seqs, " sequences (decode: one token each)");
  const at::Tensor table = block_tables.contiguous();
  const at::Tensor lens_t = seq_lens.contiguous();
  check_seq_lens_and_blocks(table, lens_t, key_cache.size(0), p.block_size, /*min_len=*/1);
  p.block_tables = table.data_ptr<int32_t>();
  p.block_tables_stride = table.size(1);
  if (num_seqs == 0) return;

  // Visible keys of sequence s: [first_key, len), its one query at position len - 1.
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  auto first_key = [&](int64_t len) { return std::max<int64_t>(0, len - p.sliding_window); };
  int64_t total_keys = 0;
  for (int64_t s = 0; s < num_seqs; ++s) total_keys += lens[s] - first_key(lens[s]);

  // A sequence's KV heads share an item while their query heads fit one tile: the kernel then
  // reads whole cache blocks instead of one head's strided rows, which streams much faster.
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t tiles = head_tiles(group);
  const int64_t kv_per_item =
      tiles > 1 ? 1 : std::min<int64_t>(p.num_kv_heads, cpu::kAttentionMaxRows / group);
  const int64_t kv_groups = (p.num_kv_heads + kv_per_item - 1) / kv_per_item;
  // Contexts longer than part_len are split into parts of part_len keys (flash-decoding), so
  // there are about four items per thread however few or skewed the sequences are; each split
  // sequence gets its own partial-result slots, merged afterwards.
  const int64_t threads = at::get_num_threads();
  const int64_t fair = total_keys * kv_groups * tiles / (4 * threads);
  const int64_t part_len =
      std::max(kMinPartKeys, (fair + kChunkKeys - 1) / kChunkKeys * kChunkKeys);
  std::vector<int32_t> merge_info;  // (seq, first slot, slots) per split sequence
  int64_t num_slots = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t parts = (lens[s] - first_key(lens[s]) + part_len - 1) / part_len;
    if (parts > 1) {
      merge_info.insert(merge_info.end(), {static_cast<int32_t>(s),
                                           static_cast<int32_t>(num_slots),
                                           static_cast<int32_t>(parts)});
      num_slots += parts;
    }
  }
  at::Tensor partial_acc, partial_ml;
  if (num_slots > 0) {
    partial_acc = at::empty({num_slots, p.num_heads, p.head_size}, at::kFloat);
    partial_ml = at::empty({num_slots, p.num_heads, 2}, at::kFloat);
    p.partial_acc = partial_acc.data_ptr<float>();
    p.partial_ml = partial_ml.data_ptr<float>();
    p.merge_info = merge_info.data();
  }

  std::vector<AttentionWorkItem> items;
  size_t next_split = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t lo = first_key(lens[s]);
    int64_t slot = -1;
    if (next_split < merge_info.size() && merge_info[next_split] == s) {
      slot = merge_info[next_split + 1];
      next_split += 3;
    }
    for (int64_t kv_group = 0; kv_group < kv_groups; ++kv_group)
      for (int64_t tile = 0; tile < tiles; ++tile)
        for (int64_t k0 = lo, part = 0; k0 < lens[s]; k0 += part_len, ++part) {
          AttentionWorkItem w{};
          w.seq = static_cast<int32_t>(s);
          w.kv_head = static_cast<int32_t>(p.num_kv_heads * kv_group / kv_groups);
          w.kv_head_end = static_cast<int32_t>(p.num_kv_heads * (kv_group + 1) / kv_groups);
          w.head_begin = static_cast<int32_t>(group * tile / tiles);
          w.head_end = static_cast<int32_t>(group * (tile + 1) / tiles);
          w.q_begin = static_cast<int32_t>(s);
          w.q_end = static_cast<int32_t>(s + 1);
          w.pos_begin = lens[s] - 1;
          w.key_begin = static_cast<int32_t>(k0);
          w.key_end = static_cast<int32_t>(std::min<int64_t>(k0 + part_len, lens[s]));
          w.part = slot >= 0 ? static_cast<int32_t>(slot + part) : -1;
          items.push_back(w);
        }
  }
  run_items(p, items);
  if (num_slots > 0) {
    const int64_t rows = static_cast<int64_t>(merge_info.size() / 3) * p.num_heads;
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      SAGELLM_CPU_DISPATCH(paged_attention_merge, p, begin, end);
    });
  }
}

void paged_attention_prefill_cpu(at::Tensor& out, const at::Tensor& query,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                 const at::Tensor& query_start_loc, double scale,
                                 int64_t sliding_window, double soft_cap) {
  PagedAttentionParams p = check_and_describe(out, query, key_cache, value_cache, block_tables,
                                              seq_lens, scale, sliding_window, soft_cap);
  check_int32(query_start_loc, "query_start_loc", 1);
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t num_tokens = query.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1, "query_start_loc must have num_seqs + 1 = ",
              num_seqs + 1, " entries, got ", query_start_loc.size(0));
  TORCH_CHECK(num_tokens <= std::numeric_limits<int32_t>::max(), "query has too many tokens: ",
              num_tokens);
  const at::Tensor table = block_tables.contiguous();
  const at::Tensor lens_t = seq_lens.contiguous();
  const at::Tensor qsl_t = query_start_loc.contiguous();
  check_seq_lens_and_blocks(table, lens_t, key_cache.size(0), p.block_size, /*min_len=*/0);
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int32_t* qsl = qsl_t.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0, "query_start_loc[0] must be 0, got ", qsl[0]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(qsl[s + 1] >= qsl[s], "query_start_loc must be nondecreasing, got ",
                "query_start_loc[", s, "] = ", qsl[s], " > query_start_loc[", s + 1,
                "] = ", qsl[s + 1]);
    TORCH_CHECK(qsl[s + 1] - qsl[s] <= lens[s], "sequence ", s, " has ", qsl[s + 1] - qsl[s],
                " new tokens (query_start_loc) but seq_lens[", s, "] = ", lens[s]);
  }
  TORCH_CHECK(qsl[num_seqs] == num_tokens, "query_start_loc[", num_seqs, "] = ", qsl[num_seqs],
              " must equal the number of query tokens ", num_tokens);
  p.block_tables = table.data_ptr<int32_t>();
  p.block_tables_stride = table.size(1);

  // Tiles of tokens x heads: as many consecutive tokens as fit kAttentionMaxRows rows with the
  // group's heads, so each K/V chunk loaded is reused by all of them.
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t tiles = head_tiles(group);
  const int64_t heads_per_tile = (group + tiles - 1) / tiles;
  const int64_t tokens_per_tile = std::max<int64_t>(1, cpu::kAttentionMaxRows / heads_per_tile);
  std::vector<AttentionWorkItem> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    for (int64_t t0 = 0; t0 < q_len; t0 += tokens_per_tile) {
      const int64_t t1 = std::min(q_len, t0 + tokens_per_tile);
      const int64_t pos0 = lens[s] - q_len + t0;
      const int64_t key_begin = std::max<int64_t>(0, pos0 - p.sliding_window + 1);
      for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh)
        for (int64_t tile = 0; tile < tiles; ++tile) {
          AttentionWorkItem w{};
          w.seq = static_cast<int32_t>(s);
          w.kv_head = static_cast<int32_t>(kvh);
          w.kv_head_end = static_cast<int32_t>(kvh + 1);
          w.head_begin = static_cast<int32_t>(group * tile / tiles);
          w.head_end = static_cast<int32_t>(group * (tile + 1) / tiles);
          w.q_begin = static_cast<int32_t>(qsl[s] + t0);
          w.q_end = static_cast<int32_t>(qsl[s] + t1);
          w.pos_begin = static_cast<int32_t>(pos0);
          w.key_begin = static_cast<int32_t>(key_begin);
          w.key_end = static_cast<int32_t>(lens[s] - q_len + t1);
          w.part = -1;
          items.push_back(w);
        }
    }
  }
  if (!items.empty()) run_items(p, items);
}

}  // namespace sagellm

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("paged_attention_decode", &sagellm::paged_attention_decode_cpu);
  m.impl("paged_attention_prefill", &sagellm::paged_attention_prefill_cpu);
}
