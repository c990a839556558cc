// Paged attention on the CPU: the plain-C++ interface between the entry file (validation,
// planning, threading) and the ISA kernel file (compiled once per ISA).
//
// One kernel serves decode and prefill. Its unit of work is a tile of query rows that share one
// KV head (the heads of a GQA group, times a few consecutive query tokens of one sequence) run
// against a contiguous range of that sequence's keys, so every K/V row read from memory is used
// by all rows of the tile. Decode may split a long context over several work items ("parts",
// flash-decoding); those write unnormalised partial results that a merge pass combines.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/types.h"

namespace sagellm::cpu {

// Head sizes with a compiled kernel (a template parameter; see attention_kernels.cpp).
inline constexpr int kAttentionHeadSizes[] = {64, 80, 96, 128, 256};
// Most query rows in one work item: bounds the kernel's stack buffers.
inline constexpr int kAttentionMaxRows = 32;

// One tile: for each KV head in [kv_head, kv_head_end), query tokens [q_begin, q_end) (rows of
// `query`) x heads [head_begin, head_end) of that head's GQA group, against keys
// [key_begin, key_end) of sequence seq. Query token q_begin sits at cache position pos_begin,
// the next ones follow. part < 0: write the normalised result to `out`; else write slot `part`
// of the partial buffers (decode only, one token per item).
struct AttentionWorkItem {
  int32_t seq;
  int32_t kv_head;
  int32_t kv_head_end;
  int32_t head_begin;
  int32_t head_end;
  int32_t q_begin;
  int32_t q_end;
  int32_t pos_begin;
  int32_t key_begin;
  int32_t key_end;
  int32_t part;
};

// Storage of the KV cache: the model dtype, or one byte per element with an fp32 scale per
// cached (token, KV head).
enum class KVStore : int { kModel = 0, kInt8 = 1, kFp8E4M3 = 2 };
// The quantized element types (one byte each, layout-compatible with int8 / float8_e4m3fn).
struct q8 {
  int8_t v;
};
struct e4m3 {
  uint8_t bits;
};

struct PagedAttentionParams {
  DType dtype;
  KVStore kv_store;
  int head_size;
  int num_heads;
  int num_kv_heads;
  int block_size;

  // query / out: [num_tokens, num_heads, head_size], element strides of dims 0 and 1.
  const void* query;
  int64_t q_stride_token;
  int64_t q_stride_head;
  void* out;
  int64_t out_stride_token;
  int64_t out_stride_head;

  // key_cache / value_cache: contiguous [num_blocks, block_size, num_kv_heads, head_size].
  const void* key_cache;
  const void* value_cache;
  // Quantized caches only: [num_blocks, block_size, num_kv_heads]; the key/value is the stored
  // element times its row's scale.
  const float* k_scales;
  const float* v_scales;

  // block_tables: [num_seqs, block_tables_stride] (row stride in elements).
  const int32_t* block_tables;
  int64_t block_tables_stride;

  float scale;
  int64_t sliding_window;  // a key k is visible from position p iff p - k < sliding_window
  float soft_cap;          // 0: off

  const AttentionWorkItem* items;

  // Split-context decode: per (slot, head) the unnormalised accumulator [head_size] and
  // (running max, running sum); a split sequence owns consecutive slots. merge_info holds
  // (seq, first slot, number of slots) per split sequence. Null when nothing is split.
  float* partial_acc;
  float* partial_ml;
  const int32_t* merge_info;
};

// Runs items[begin, end).
SAGELLM_DECLARE_PER_ISA(void paged_attention_run(const PagedAttentionParams& p, int64_t begin,
                                                 int64_t end))
// Decode only: combines the slots of rows [begin, end) of [split sequences * num_heads] into out.
SAGELLM_DECLARE_PER_ISA(void paged_attention_merge(const PagedAttentionParams& p, int64_t begin,
                                                   int64_t end))

}  // namespace sagellm::cpu
