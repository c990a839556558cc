"""Gated activations (SwiGLU / GeGLU): typed wrappers over torch.ops.sagellm and fake kernels.

act(gate) is rounded to the input dtype before the multiply by up, as in Hugging Face's MLPs.
"""

from __future__ import annotations

import torch

import sagellm  # noqa: F401  (loads the extension that registers torch.ops.sagellm)


def _out_for(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    return out


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = silu(x[..., :d]) * x[..., d:].

    x: [..., 2d], fp32/fp16/bf16 (rows may be strided, innermost dim contiguous).
    out: [..., d], x's dtype (allocated when None). Returns out.
    """
    out = _out_for(x, out)
    torch.ops.sagellm.silu_and_mul(out, x)
    return out


def gelu_and_mul(
    x: torch.Tensor, approximate: str = "none", *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """out = gelu(x[..., :d]) * x[..., d:]; approximate 'none' (exact erf) or 'tanh' (Gemma).

    x: [..., 2d], fp32/fp16/bf16; out: [..., d], x's dtype (allocated when None). Returns out.
    """
    out = _out_for(x, out)
    torch.ops.sagellm.gelu_and_mul(out, x, approximate)
    return out


def _check_gated_shapes(out: torch.Tensor, input: torch.Tensor) -> None:
    torch._check(input.shape[-1] % 2 == 0, lambda: "input's last dim must be even (2 * d)")
    expected = (*input.shape[:-1], input.shape[-1] // 2)
    torch._check(
        tuple(out.shape) == expected,
        lambda: f"out has shape {tuple(out.shape)}; expected {expected}",
    )


@torch.library.register_fake("sagellm::silu_and_mul")
def _silu_and_mul_fake(out, input) -> None:
    _check_gated_shapes(out, input)


@torch.library.register_fake("sagellm::gelu_and_mul")
def _gelu_and_mul_fake(out, input, approximate="none") -> None:
    torch._check(
        approximate in ("none", "tanh"),
        lambda: f"approximate = {approximate!r}; expected 'none' or 'tanh'",
    )
    _check_gated_shapes(out, input)
