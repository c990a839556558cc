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
#include <cstdint>
#include <optional>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/cpu/attention_kernels.h"
#include "cpu/dtype.h"
#include "ops.h"

namespace sagellm {
namespace {

using cpu::AttentionWorkItem;
using cpu::PagedAttentionParams;

// The shared checks accept exactly the head sizes this file's kernels are compiled for.
static_assert(sizeof(attention::kHeadSizes) == sizeof(cpu::kAttentionHeadSizes));
static_assert([] {
  for (size_t i = 0; i < std::size(attention::kHeadSizes); ++i)
    if (attention::kHeadSizes[i] != cpu::kAttentionHeadSizes[i]) return false;
  return true;
}());

// Decode never splits a context into parts shorter than this many keys.
constexpr int64_t kMinPartKeys = 256;
constexpr int64_t kChunkKeys = 32;  // the kernel's key chunk; parts are multiples of it

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

// Checks shared by both ops (attention/attention_checks.h); fills everything in the params but
// the block table and the work items.
PagedAttentionParams check_and_describe(const char* op, const at::Tensor& out,
                                        const at::Tensor& query, const at::Tensor& key_cache,
                                        const at::Tensor& value_cache,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        double scale, int64_t sliding_window, double soft_cap,
                                        const std::optional<at::Tensor>& k_scales,
                                        const std::optional<at::Tensor>& v_scales) {
  const attention::AttentionDims d =
      attention::check_attention_inputs(out, query, key_cache, value_cache, block_tables,
                                        seq_lens, scale, sliding_window, soft_cap, check_cpu);
  const attention::KVQuant quant =
      attention::check_kv_scales(op, query, key_cache, value_cache, k_scales, v_scales);
  PagedAttentionParams p{};
  p.dtype = cpu::kernel_dtype(query, "paged_attention", "query");
  p.kv_store = quant == attention::KVQuant::kInt8      ? cpu::KVStore::kInt8
               : quant == attention::KVQuant::kFp8E4M3 ? cpu::KVStore::kFp8E4M3
                                                       : cpu::KVStore::kModel;
  if (quant != attention::KVQuant::kNone) {
    p.k_scales = k_scales->data_ptr<float>();
    p.v_scales = v_scales->data_ptr<float>();
  }
  p.head_size = d.head_size;
  p.num_heads = d.num_heads;
  p.num_kv_heads = d.num_kv_heads;
  p.block_size = d.block_size;
  p.query = query.data_ptr();
  p.q_stride_token = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.out = out.data_ptr();
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.scale = static_cast<float>(scale);
  p.sliding_window = d.sliding_window;
  p.soft_cap = static_cast<float>(soft_cap);
  return p;
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
                                double scale, int64_t sliding_window, double soft_cap,
                                const std::optional<at::Tensor>& k_scales,
                                const std::optional<at::Tensor>& v_scales) {
  PagedAttentionParams p =
      check_and_describe("paged_attention_decode", out, query, key_cache, value_cache,
                         block_tables, seq_lens, scale, sliding_window, soft_cap, k_scales,
                         v_scales);
  const int64_t num_seqs = seq_lens.size(0);
  attention::check_decode_tokens(query, seq_lens);
  const at::Tensor table = block_tables.contiguous();
  const at::Tensor lens_t = seq_lens.contiguous();
  attention::check_seq_lens_and_blocks(table, lens_t, key_cache.size(0), p.block_size,
                                       /*min_len=*/1);
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
                                 int64_t sliding_window, double soft_cap,
                                 const std::optional<at::Tensor>& k_scales,
                                 const std::optional<at::Tensor>& v_scales) {
  PagedAttentionParams p =
      check_and_describe("paged_attention_prefill", out, query, key_cache, value_cache,
                         block_tables, seq_lens, scale, sliding_window, soft_cap, k_scales,
                         v_scales);
  attention::check_prefill_query_start_loc(query_start_loc, query, seq_lens, check_cpu);
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t num_tokens = query.size(0);
  const at::Tensor table = block_tables.contiguous();
  const at::Tensor lens_t = seq_lens.contiguous();
  const at::Tensor qsl_t = query_start_loc.contiguous();
  attention::check_seq_lens_and_blocks(table, lens_t, key_cache.size(0), p.block_size,
                                       /*min_len=*/0);
  attention::check_query_start_loc(qsl_t, lens_t, num_tokens);
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int32_t* qsl = qsl_t.data_ptr<int32_t>();
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
