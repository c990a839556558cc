"""Pure-torch gated-activation references (fp64 math), rounded where Hugging Face rounds.

HF's MLPs compute act(gate) * up on tensors of the model's dtype: the activation is rounded to
that dtype before the multiply, and the product is rounded again. The kernels do the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gated(x: torch.Tensor, act) -> torch.Tensor:
    d = x.shape[-1] // 2
    gate, up = x[..., :d].to(torch.float64), x[..., d:].to(torch.float64)
    return (act(gate).to(x.dtype).to(torch.float64) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> [..., d] = silu(x[..., :d]) * x[..., d:]."""
    return _gated(x, F.silu)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x [..., 2d] -> [..., d] = gelu(x[..., :d]) * x[..., d:]; approximate 'none' (erf) or 'tanh'."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate = {approximate!r}; expected 'none' or 'tanh'")
    return _gated(x, lambda g: F.gelu(g, approximate=approximate))
