"""Pure-torch RMSNorm references, with the rounding points of Hugging Face's LlamaRMSNorm.

HF normalises in fp32, casts the normalised activations back to the input dtype, and only then
multiplies by the weight (in the weight's dtype, here the same): two roundings for fp16/bf16.
The kernels round at the same two points, so a model built on them reproduces transformers.
"""

from __future__ import annotations

import torch


def rms_norm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """input [..., hidden], weight [hidden] -> [..., hidden] in input's dtype."""
    x = input.to(torch.float32)
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = normed.to(input.dtype).to(torch.float32) * weight.to(torch.float32)
    return y.to(input.dtype)


def fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(input + residual) * weight, input + residual), both in input's dtype.

    The sum is rounded to the residual's dtype before it is normalised, as in HF where the
    residual stream is a tensor of the model's dtype.
    """
    new_residual = (input.to(torch.float32) + residual.to(torch.float32)).to(residual.dtype)
    return rms_norm(new_residual, weight, eps).to(input.dtype), new_residual
