"""Reference paged attention: gather each sequence's K/V through its block table, then plain
masked softmax attention in fp64. Slow and simple on purpose; the tests compare the kernels to it.

A quantized cache (k_scales/v_scales given) is dequantized first (stored value times its scale,
in fp32), then attended to exactly like an fp cache.
"""

from __future__ import annotations

import torch

from sagellm.ops.reference.cache import dequantize_kv


def _dequantized(key_cache, value_cache, k_scales, v_scales):
    if k_scales is None and v_scales is None:
        return key_cache, value_cache
    return dequantize_kv(key_cache, k_scales), dequantize_kv(value_cache, v_scales)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[num_blocks, block_size, num_kv_heads, head_size] -> [seq_len, num_kv_heads, head_size]."""
    block_size = cache.shape[1]
    num_used = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_used].long()]  # [num_used, block_size, kv_heads, head_size]
    return blocks.flatten(0, 1)[:seq_len]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> torch.Tensor:
    """q [n, heads, d] at cache positions `positions` [n]; k, v [seq_len, kv_heads, d]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # query head h uses kv head h // group
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    key_pos = torch.arange(k.shape[0], device=k.device)
    positions = positions.to(k.device)
    distance = positions[:, None] - key_pos[None, :]  # [n, seq_len]
    visible = distance >= 0
    if sliding_window is not None and sliding_window >= 0:
        visible &= distance < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


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
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [num_seqs, num_heads, head_size]; the token of sequence i is at seq_lens[i] - 1."""
    key_cache, value_cache = _dequantized(key_cache, value_cache, k_scales, v_scales)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    for i, seq_len in enumerate(seq_lens.tolist()):
        k = _gather(key_cache, block_tables[i], seq_len)
        v = _gather(value_cache, block_tables[i], seq_len)
        positions = torch.tensor([seq_len - 1])
        o = _attend(query[i : i + 1], k, v, positions, scale, sliding_window, soft_cap)
        out[i] = o[0].to(query.dtype)
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
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [num_tokens, num_heads, head_size] packed by query_start_loc; the q_len new tokens of
    sequence i are the last q_len of its seq_lens[i] cached tokens."""
    key_cache, value_cache = _dequantized(key_cache, value_cache, k_scales, v_scales)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q = query[starts[i] : starts[i + 1]]
        if q.shape[0] == 0:
            continue
        k = _gather(key_cache, block_tables[i], seq_len)
        v = _gather(value_cache, block_tables[i], seq_len)
        positions = torch.arange(seq_len - q.shape[0], seq_len)
        o = _attend(q, k, v, positions, scale, sliding_window, soft_cap)
        out[starts[i] : starts[i + 1]] = o.to(query.dtype)
    return out
