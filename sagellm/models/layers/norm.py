"""Normalisation layers on the fused sagellm kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sagellm.ops import norm as norm_ops


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, over the last dimension (fp32 inside the kernel).

    Gemma stores w as an offset from 1 (y = x / rms(x) * (1 + w)); pass `offset=1.0` and the
    offset is folded into the weight once at load, so the kernel stays the same.
    """

    def __init__(self, hidden: int, eps: float, *, dtype, device, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(
            torch.ones(hidden, dtype=dtype, device=device), requires_grad=False
        )

    def load_weight(self, w: torch.Tensor) -> None:
        if w.shape != self.weight.shape:
            raise ValueError(
                f"norm weight has shape {tuple(w.shape)}, expected {tuple(self.weight.shape)}"
            )
        self.weight.data.copy_(w.float() + self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_ops.rms_norm(x, self.weight, self.eps)

    def forward_add(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x; x = norm(residual). Both in place; returns (x, residual)."""
        norm_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual


class LayerNorm(nn.Module):
    """Standard LayerNorm with bias (GPT-2)."""

    def __init__(self, hidden: int, eps: float, *, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = nn.Parameter(
            torch.zeros(hidden, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
