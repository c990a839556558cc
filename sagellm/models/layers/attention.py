"""Paged attention for one layer, and the per-step metadata every layer shares.

The model runner builds one `AttentionMetadata` per step (DESIGN.md: "built once per step, shared
by all layers"); each layer writes its new K/V into its cache slots, then attends through the
block tables with the decode kernel (one new token per sequence) or the prefill/extend kernel
(any mix of prefill chunks, prefix-cache hits and decodes).

A layer's cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_size] in the model
dtype, or a QuantizedKVCache (int8 / float8_e4m3fn values plus one fp32 scale per cached token and
KV head). The models pass it through untouched, so both kinds run the same model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sagellm.ops import attention as attn_ops
from sagellm.ops import cache as cache_ops


@dataclass(frozen=True)
class QuantizedKVCache:
    """One layer's quantized KV cache: data[0] keys, data[1] values; stored value x scale is the
    key/value (reshape_and_cache quantizes the new rows, the attention ops dequantize)."""

    data: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_size] int8 | e4m3fn
    scales: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads] fp32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales))


KVCache = torch.Tensor | QuantizedKVCache


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens], cache slot of each new token
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs], tokens in the cache after this step
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], packed new tokens
    decode_only: bool  # every sequence adds exactly one token


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        *,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale, self.sliding_window, self.soft_cap = scale, sliding_window, soft_cap

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_size] (rows may be strided)
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
        kv_cache: KVCache,  # [2, num_blocks, block_size, num_kv_heads, head_size] (+ scales)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_size]
        t = q.shape[0]
        q = (
            q.view(t, self.num_heads, self.head_size)
            if q.is_contiguous()
            else q.unflatten(-1, (self.num_heads, self.head_size))
        )
        k = k.unflatten(-1, (self.num_kv_heads, self.head_size))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_size))
        scales = {}
        if isinstance(kv_cache, QuantizedKVCache):
            scales = {"k_scales": kv_cache.scales[0], "v_scales": kv_cache.scales[1]}
            kv_cache = kv_cache.data
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        cache_ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping, **scales)
        if meta.decode_only:
            out = attn_ops.paged_attention_decode(
                q,
                key_cache,
                value_cache,
                meta.block_tables,
                meta.seq_lens,
                self.scale,
                sliding_window=self.sliding_window,
                soft_cap=self.soft_cap,
                **scales,
            )
        else:
            out = attn_ops.paged_attention_prefill(
                q,
                key_cache,
                value_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                self.scale,
                sliding_window=self.sliding_window,
                soft_cap=self.soft_cap,
                **scales,
            )
        return out.view(t, self.num_heads * self.head_size)
