"""Pure-torch rotary-embedding reference (fp32 math), returning new tensors."""

from __future__ import annotations

import torch


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int, is_neox: bool
) -> torch.Tensor:
    num_tokens = x.shape[0]
    heads = x.reshape(num_tokens, -1, head_size).to(torch.float32)
    rot_dim = cos.shape[-1] * 2
    rot, rest = heads[..., :rot_dim], heads[..., rot_dim:]
    c, s = cos[:, None, :], sin[:, None, :]
    if is_neox:  # pairs (i, i + rot_dim / 2)
        x1, x2 = rot[..., : rot_dim // 2], rot[..., rot_dim // 2 :]
        rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    else:  # GPT-J: pairs (2i, 2i + 1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1).to(x.dtype).reshape(x.shape)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (query, key) rotated; shapes as the inputs, key None stays None.

    positions int64 [num_tokens]; query [num_tokens, num_heads * head_size] or
    [num_tokens, num_heads, head_size]; cos_sin_cache [max_position, rot_dim] (cos, then sin);
    only the first rot_dim dims of each head rotate.
    """
    cs = cos_sin_cache.to(torch.float32)[positions]
    cos, sin = cs.chunk(2, dim=-1)
    q = _rotate(query, cos, sin, head_size, is_neox)
    k = None if key is None else _rotate(key, cos, sin, head_size, is_neox)
    return q, k
