// Paged attention on CUDA: the interface between the entry file (attention_cuda_entry.cu:
// validation, workspace, dispatch) and the kernel files (paged_decode.cu, paged_prefill.cu).
//
// Layouts are those of the schemas in csrc/torch_bindings.cpp. Nothing here reads device memory
// on the host: the launchers size their grids from host-known shapes only (num_seqs,
// num_tokens, max_blocks_per_seq), so every launch is legal inside CUDA-graph capture.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sagellm::cuda {

enum class AttnDType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct PagedAttentionCudaParams {
  AttnDType dtype;
  int head_size;     // 64, 80, 96, 128 or 256
  int num_heads;     // query heads
  int num_kv_heads;  // num_heads % num_kv_heads == 0
  int block_size;    // tokens per cache block (any >= 1; 16 is the engine default)
  int num_seqs;
  int num_tokens;          // query rows (decode: == num_seqs)
  int max_blocks_per_seq;  // block_tables.size(1); bounds every seq_len on the host side

  // query / out: [num_tokens, num_heads, head_size]; element strides of dims 0 and 1
  // (head_size is contiguous).
  const void* query;
  int64_t q_stride_token;
  int64_t q_stride_head;
  void* out;
  int64_t out_stride_token;
  int64_t out_stride_head;

  // key_cache / value_cache: contiguous [num_blocks, block_size, num_kv_heads, head_size].
  const void* key_cache;
  const void* value_cache;
  int64_t num_blocks;

  const int32_t* block_tables;  // [num_seqs, block_tables_stride]
  int64_t block_tables_stride;
  const int32_t* seq_lens;         // [num_seqs], tokens in the cache including the new ones
  const int32_t* query_start_loc;  // [num_seqs + 1]; null for decode (one token per sequence)

  float scale;
  int sliding_window;  // a key k is visible from query position p iff p - k < sliding_window;
                       // INT32_MAX when off
  float soft_cap;      // 0: off, else s -> soft_cap * tanh(s / soft_cap)

  // Decode split-KV scratch, allocated by the entry from decode_workspace_floats(): partial
  // accumulators and (max, sum) pairs per (sequence, head, partition). Null for prefill.
  float* workspace;
  int64_t workspace_floats;
};

// Scratch floats the decode launcher needs for these params (0 when nothing is split).
int64_t decode_workspace_floats(const PagedAttentionCudaParams& p);

// Launch on `stream`; the caller has validated p. Both report launch errors through
// C10_CUDA_KERNEL_LAUNCH_CHECK.
void launch_paged_attention_decode(const PagedAttentionCudaParams& p, cudaStream_t stream);
void launch_paged_attention_prefill(const PagedAttentionCudaParams& p, cudaStream_t stream);

}  // namespace sagellm::cuda
