"""Paged attention over the block-table KV cache: decode (one new token per sequence) and
prefill/extend (a packed batch of new tokens per sequence, attending to its cached prefix too).

Cache layout (per layer): key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_size],
contiguous. Metadata: block_tables int32 [num_seqs, max_blocks_per_seq], seq_lens int32
[num_seqs] (tokens in the cache, the new ones included: reshape_and_cache runs first),
query_start_loc int32 [num_seqs + 1]. num_heads must be a multiple of num_kv_heads (GQA/MQA);
head_size one of 64, 80, 96, 128, 256; query, caches and out share one dtype (fp32, fp16, bf16).

Quantized KV cache: key_cache/value_cache int8 or float8_e4m3fn (same layout), with k_scales and
v_scales fp32 [num_blocks, block_size, num_kv_heads], one scale per cached token and KV head; the
key/value is the stored element times its scale (reshape_and_cache writes both). query and out
keep the model dtype. Scales are given iff the cache is quantized.
"""

from __future__ import annotations

import torch

# Cache dtypes stored quantized, with one fp32 scale per (slot, KV head) (also ops/cache.py).
QUANT_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)


def _window(sliding_window: int | None) -> int:
    return -1 if sliding_window is None else sliding_window


def _cap(soft_cap: float | None) -> float:
    return 0.0 if soft_cap is None else soft_cap


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    query: [num_seqs, num_heads, head_size]; rows may be strided, head_size contiguous. The token
        of sequence i sits at position seq_lens[i] - 1 (seq_lens[i] >= 1).
    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size].
    block_tables: int32 [num_seqs, max_blocks_per_seq]; seq_lens: int32 [num_seqs].
    scale: multiplies q . k (usually head_size ** -0.5).
    sliding_window: a key k is visible from position p iff p - k < sliding_window (None: off).
    soft_cap: scores become soft_cap * tanh(score / soft_cap) (None: off).
    out: [num_seqs, num_heads, head_size], written and returned (allocated when None).
    k_scales, v_scales: fp32 [num_blocks, block_size, num_kv_heads] for an int8 / float8_e4m3fn
        cache (required then, refused otherwise).
    """
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    torch.ops.sagellm.paged_attention_decode(
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        scale,
        _window(sliding_window),
        _cap(soft_cap),
        k_scales,
        v_scales,
    )
    return out


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over each sequence's cached prefix plus themselves.

    query: [num_tokens, num_heads, head_size], sequence i's tokens at rows
        query_start_loc[i] : query_start_loc[i + 1] (q_len_i of them, possibly 0); they are the
        last q_len_i of its seq_lens[i] cached tokens, so token j sits at position
        seq_lens[i] - q_len_i + j and sees keys 0 ..= that position. Rows may be strided.
    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size].
    block_tables: int32 [num_seqs, max_blocks_per_seq]; seq_lens: int32 [num_seqs];
    query_start_loc: int32 [num_seqs + 1], starts at 0, nondecreasing, ends at num_tokens.
    scale, sliding_window, soft_cap, k_scales, v_scales: as in paged_attention_decode.
    out: [num_tokens, num_heads, head_size], written and returned (allocated when None).
    """
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    torch.ops.sagellm.paged_attention_prefill(
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        _window(sliding_window),
        _cap(soft_cap),
        k_scales,
        v_scales,
    )
    return out


def _check_fake(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    torch._check(query.dim() == 3, lambda: f"query must be 3-D, got {tuple(query.shape)}")
    torch._check(
        out.shape == query.shape,
        lambda: f"out must have the shape of query {tuple(query.shape)}, got {tuple(out.shape)}",
    )
    torch._check(
        key_cache.dim() == 4 and key_cache.shape[3] == query.shape[2],
        lambda: f"key_cache {tuple(key_cache.shape)} does not match query {tuple(query.shape)}",
    )
    _check_scales_fake(key_cache, k_scales, v_scales)


def _check_scales_fake(key_cache, k_scales, v_scales) -> None:
    quantized = key_cache.dtype in QUANT_KV_DTYPES
    torch._check(
        quantized == (k_scales is not None) and quantized == (v_scales is not None),
        lambda: (
            f"k_scales/v_scales must be given iff the cache is quantized "
            f"(key_cache dtype {key_cache.dtype})"
        ),
    )
    for s in (k_scales, v_scales):
        if s is not None:
            torch._check(
                s.shape == key_cache.shape[:3],
                lambda s=s: f"scales {tuple(s.shape)} must be {tuple(key_cache.shape[:3])}",
            )


@torch.library.register_fake("sagellm::paged_attention_decode")
def _decode_fake(
    out,
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    scale,
    sliding_window=-1,
    soft_cap=0.0,
    k_scales=None,
    v_scales=None,
) -> None:
    _check_fake(out, query, key_cache, k_scales, v_scales)


@torch.library.register_fake("sagellm::paged_attention_prefill")
def _prefill_fake(
    out,
    query,
    key_cache,
    value_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    sliding_window=-1,
    soft_cap=0.0,
    k_scales=None,
    v_scales=None,
) -> None:
    _check_fake(out, query, key_cache, k_scales, v_scales)
