"""Pure-torch KV-cache references; each returns new caches instead of writing in place."""

from __future__ import annotations

import torch


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (key_cache, value_cache) with token t written at slot slot_mapping[t] (-1: skip).

    key, value [num_tokens, num_kv_heads, head_size];
    caches [num_blocks, block_size, num_kv_heads, head_size].
    """
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot == -1:
            continue
        key_cache[slot // block_size, slot % block_size] = key[t]
        value_cache[slot // block_size, slot % block_size] = value[t]
    return key_cache, value_cache


def copy_blocks(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Returns every layer's caches with block src copied to dst for each (src, dst), in order."""
    out_k = [c.clone() for c in key_caches]
    out_v = [c.clone() for c in value_caches]
    for src, dst in block_mapping.tolist():
        for cache in out_k + out_v:
            cache[dst] = cache[src]
    return out_k, out_v


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> torch.Tensor:
    """Returns dst with dst[d] = src[s] for each (s, d) in block_mapping."""
    out = dst.clone()
    for s, d in block_mapping.tolist():
        out[d] = src[s].to(out.device)
    return out
