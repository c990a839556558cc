"""Rotary position embedding: typed wrapper over torch.ops.sagellm, its fake kernel, and the
cos/sin cache builder."""

from __future__ import annotations

import torch

import sagellm  # noqa: F401  (loads the extension that registers torch.ops.sagellm)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotate query (and key) in place by the cos/sin rows at positions.

    positions: int64 [num_tokens], each in [0, max_position).
    query: [num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size],
        fp32/fp16/bf16; token rows may be strided (e.g. a slice of a fused qkv buffer), each head
        contiguous.
    key: like query with num_kv_heads, same dtype; or None.
    cos_sin_cache: [max_position, rot_dim], fp32 or query's dtype; cos in the first rot_dim / 2
        columns, sin in the rest. rot_dim is even and <= head_size; only the first rot_dim dims
        of each head rotate (partial rotary).
    is_neox: True rotates pairs (i, i + rot_dim / 2) (Llama, Qwen); False pairs (2i, 2i + 1)
        (GPT-J).
    """
    torch.ops.sagellm.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


def make_cos_sin_cache(
    rot_dim: int,
    max_position: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """[max_position, rot_dim]: cos(p * inv_freq) then sin(p * inv_freq) per position p.

    inv_freq: [rot_dim / 2] frequencies; default base ** (-arange(0, rot_dim, 2) / rot_dim).
    Pass scaled frequencies (e.g. Llama-3 rope scaling) to override. Computed in fp64.
    """
    if rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"rot_dim = {rot_dim} must be even and > 0")
    if inv_freq is None:
        exponent = torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim
        inv_freq = base**-exponent
    inv_freq = inv_freq.to(torch.float64)
    if inv_freq.shape != (rot_dim // 2,):
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}; expected ({rot_dim // 2},)")
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


@torch.library.register_fake("sagellm::rotary_embedding")
def _rotary_embedding_fake(positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
    torch._check(
        query.shape[0] == positions.shape[0],
        lambda: f"query has {query.shape[0]} tokens but positions has {positions.shape[0]}",
    )
    torch._check(
        cos_sin_cache.shape[-1] <= head_size,
        lambda: f"rot_dim = {cos_sin_cache.shape[-1]} exceeds head_size = {head_size}",
    )
