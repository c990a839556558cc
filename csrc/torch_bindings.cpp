// Every sageLLM tensor op is declared here, once, with its schema. Device files attach
// implementations with TORCH_LIBRARY_IMPL(sagellm, <key>, m); Python callers use sagellm.ops,
// which also registers a fake (meta) kernel for each op so torch.compile can trace it.
//
// Conventions:
//   * Ops write into caller-provided outputs marked (a!) and return nothing, so the engine can
//     reuse static buffers (CUDA graphs) and torch.compile knows exactly what is mutated.
//   * Paged KV cache, per layer: key_cache and value_cache are each
//     [num_blocks, block_size, num_kv_heads, head_size] ("NHD"; the two halves of one
//     [2, num_blocks, block_size, num_kv_heads, head_size] tensor).
//   * Step metadata: block_tables int32 [num_seqs, max_blocks_per_seq], seq_lens int32 [num_seqs]
//     (tokens in the cache after this step), query_start_loc int32 [num_seqs + 1] (packed new
//     tokens), slot_mapping int64 [num_tokens] (cache slot of each new token, -1 = skip).
#include <torch/library.h>

TORCH_LIBRARY(sagellm, m) {
  // ---- attention (csrc/attention/) -------------------------------------------------------
  // out, query: [num_seqs, num_heads, head_size]; one new token per sequence, already in the
  // cache at position seq_lens[i] - 1. sliding_window = -1 disables the window (else a key is
  // visible when q_pos - k_pos < sliding_window); soft_cap = 0 disables logit soft-capping
  // (else s -> soft_cap * tanh(s / soft_cap)).
  // Quantized KV cache: key_cache/value_cache int8 or float8_e4m3fn, with k_scales/v_scales
  // fp32 [num_blocks, block_size, num_kv_heads] (one scale per cached token and KV head; the
  // stored value times its scale is the key/value). Both scales are given iff the cache is
  // quantized; query/out keep the model dtype.
  m.def(
      "paged_attention_decode(Tensor(a!) out, Tensor query, Tensor key_cache, "
      "Tensor value_cache, Tensor block_tables, Tensor seq_lens, float scale, "
      "int sliding_window=-1, float soft_cap=0.0, Tensor? k_scales=None, "
      "Tensor? v_scales=None) -> ()");
  // out, query: [num_tokens, num_heads, head_size], packed by query_start_loc. The new tokens
  // of sequence i are the last (query_start_loc[i+1] - query_start_loc[i]) of its seq_lens[i]
  // cached tokens, and attend causally to everything before them (cached prefix included), so
  // chunked prefill and prefix-cache hits run through the same op.
  m.def(
      "paged_attention_prefill(Tensor(a!) out, Tensor query, Tensor key_cache, "
      "Tensor value_cache, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, "
      "float scale, int sliding_window=-1, float soft_cap=0.0, Tensor? k_scales=None, "
      "Tensor? v_scales=None) -> ()");

  // ---- KV cache (csrc/kv_cache/) ---------------------------------------------------------
  // key, value: [num_tokens, num_kv_heads, head_size] -> cache slots slot_mapping[t].
  // Quantized caches (int8 / float8_e4m3fn) also take k_scales/v_scales fp32
  // [num_blocks, block_size, num_kv_heads]: each (token, head) row x is stored as
  // q = x / s with s = max|x| / QMAX (QMAX 127 for int8, rounded half to even; 448 for e4m3,
  // rounded to nearest even, saturating), s written to the scales (max|x| < FLT_MIN: s = 0, q = 0).
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping, Tensor(c!)? k_scales=None, "
      "Tensor(d!)? v_scales=None) -> ()");
  // block_mapping int64 [n, 2]: copy block src -> dst in every layer's caches.
  m.def(
      "copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, "
      "Tensor block_mapping) -> ()");
  // src, dst: one cache each ([num_blocks, ...]), possibly on different devices;
  // block_mapping int64 [n, 2] on the CPU.
  m.def("swap_blocks(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()");

  // ---- fused small ops (csrc/cpu/elementwise_*) --------------------------------------------
  // input, out: [..., hidden]; weight: [hidden].
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) -> ()");
  // residual += input; input = rms_norm(residual) * weight.
  m.def(
      "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, "
      "float epsilon) -> ()");
  // positions int64 [num_tokens]; query [num_tokens, num_heads * head_size] (or 3-d),
  // key [num_tokens, num_kv_heads * head_size] or None; cos_sin_cache [max_position, rot_dim]
  // (cos in the first half, sin in the second), rot_dim <= head_size. In place.
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
      "Tensor cos_sin_cache, bool is_neox) -> ()");
  // input [..., 2 * d] -> out [..., d] = act(input[..., :d]) * input[..., d:].
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.def("gelu_and_mul(Tensor(a!) out, Tensor input, str approximate='none') -> ()");

  // ---- linear (csrc/linear/) -------------------------------------------------------------
  // out [M, N] = input [M, K] @ weight [N, K]^T (+ bias [N]); one dtype (fp32/fp16/bf16) for
  // all, fp32 accumulation. Built for decode-sized M (1..~16): streams the weight once.
  m.def(
      "dense_linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias) -> ()");

  // ---- quant (csrc/quant/) ---------------------------------------------------------------
  // out [M, N] = input [M, K] @ dequant(weight)^T (+ bias [N]) with the weight kept in a GGUF
  // block format: weight uint8 [N, row_bytes], each row the K / block_elems blocks of GGML
  // type `qtype` exactly as stored in the .gguf file (Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8,
  // Q4_K=12, Q5_K=13, Q6_K=14). input/out/bias: fp32 or bf16; input rows may be strided.
  // The CPU kernel quantizes input rows to int8 blocks of 32 on the fly (as llama.cpp does).
  m.def(
      "gguf_linear(Tensor(a!) out, Tensor input, Tensor weight, int qtype, Tensor? bias) -> ()");
  // out [R, K] (fp32, fp16 or bf16) = the R rows of weight uint8 [R, row_bytes] (GGML type
  // qtype, as in gguf_linear) dequantized: an embedding lookup of a quantized table reads only
  // the rows it needs, on the weight's device.
  m.def("gguf_dequantize(Tensor(a!) out, Tensor weight, int qtype) -> ()");
  // Weight-only quantized GEMMs (W8A16 / W4A16) for decode-sized and larger M.
  // out [M, N] = input [M, K] @ W^T (+ bias [N]); input/out/bias fp32, fp16 or bf16 (one dtype).
  // int8: weight int8 [N, K], W[n, k] = weight[n, k] * scales[n]; scales fp32 [N].
  m.def(
      "int8_linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor scales, "
      "Tensor? bias) -> ()");
  // int4: weight uint8 [N, K / 2], byte j of row n holds k = 2j in its low nibble and k = 2j + 1
  // in its high nibble; scales fp32 [N, K / group_size]; zeros uint8 [N, K / group_size]
  // (0..15) or None for 8 (symmetric); W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g] with
  // g = k / group_size. group_size is 32, 64 or 128 and divides K (AWQ / GPTQ checkpoints are
  // repacked into this layout at load).
  m.def(
      "int4_linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor scales, Tensor? zeros, "
      "int group_size, Tensor? bias) -> ()");

  // ---- collectives (csrc/comm/) ------------------------------------------------------------
  // Through the torch.distributed group named group_name (its group_name attribute): gloo on
  // CPU tensors, NCCL on CUDA; the group's timeout applies. Tensors contiguous; fp32, fp16,
  // bf16, int32 or int64. all_reduce: tensor = sum over ranks, in place.
  m.def("all_reduce(Tensor(a!) tensor, str group_name) -> ()");
  // out [world * n, ...] = the input [n, ...] of every rank, in rank order along dim 0.
  m.def("all_gather(Tensor(a!) out, Tensor input, str group_name) -> ()");
  // tensor = rank src's tensor (src: a rank within the group), in place.
  m.def("broadcast(Tensor(a!) tensor, int src, str group_name) -> ()");
}
