"""RMSNorm ops: typed wrappers over torch.ops.sagellm and their fake kernels.

Rounding follows Hugging Face's LlamaRMSNorm: normalise in fp32, cast to the input dtype, then
multiply by the weight (see sagellm.ops.reference.norm).
"""

from __future__ import annotations

import torch

import sagellm  # noqa: F401  (loads the extension that registers torch.ops.sagellm)


def rms_norm(
    input: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

    input: [..., hidden], fp32/fp16/bf16; rows may be strided (innermost dim contiguous), e.g. a
        per-head view [tokens, heads, head_dim] of a fused qkv buffer.
    weight: [hidden], input's dtype.
    out: [..., hidden], input's dtype (allocated when None); may be input itself.
    Returns out.
    """
    if out is None:
        out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    torch.ops.sagellm.rms_norm(out, input, weight, eps)
    return out


def fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual = input + residual; input = rms_norm(residual) * weight.

    input, residual: [..., hidden], same dtype (fp32/fp16/bf16); weight: [hidden].
    """
    torch.ops.sagellm.fused_add_rms_norm(input, residual, weight, eps)


def _check_weight(input: torch.Tensor, weight: torch.Tensor) -> None:
    torch._check(
        weight.dim() == 1 and weight.shape[0] == input.shape[-1],
        lambda: f"weight has shape {tuple(weight.shape)}; expected [{input.shape[-1]}]",
    )


@torch.library.register_fake("sagellm::rms_norm")
def _rms_norm_fake(out, input, weight, epsilon) -> None:
    torch._check(
        out.shape == input.shape,
        lambda: f"out has shape {tuple(out.shape)} but input has {tuple(input.shape)}",
    )
    _check_weight(input, weight)


@torch.library.register_fake("sagellm::fused_add_rms_norm")
def _fused_add_rms_norm_fake(input, residual, weight, epsilon) -> None:
    torch._check(
        residual.shape == input.shape,
        lambda: f"residual has shape {tuple(residual.shape)} but input has {tuple(input.shape)}",
    )
    _check_weight(input, weight)
