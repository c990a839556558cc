"""Rotary position embeddings: the cos/sin cache per scaling scheme, applied by the fused kernel."""

from __future__ import annotations

import math

import torch
from torch import nn

from sagellm.models.errors import UnsupportedModelError
from sagellm.ops import rotary as rotary_ops


def inv_frequencies(rot_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies (rot_dim / 2,) in fp64, after the checkpoint's rope scaling."""
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and a smooth ramp
        # between low_freq_factor and high_freq_factor.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)"
    )


class RotaryEmbedding(nn.Module):
    """Applies RoPE in place to packed q and k ([tokens, heads * head_size] views)."""

    def __init__(
        self,
        head_size: int,
        rot_dim: int,
        max_position: int,
        base: float,
        scaling: dict | None,
        *,
        is_neox: bool = True,
        device="cpu",
    ):
        super().__init__()
        self.head_size, self.is_neox = head_size, is_neox
        inv = inv_frequencies(rot_dim, base, scaling).to(torch.float32)
        cache = rotary_ops.make_cos_sin_cache(
            rot_dim, max_position, base, torch.float32, inv_freq=inv
        )
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        rotary_ops.rotary_embedding(
            positions, q, k, self.head_size, self.cos_sin_cache, self.is_neox
        )
