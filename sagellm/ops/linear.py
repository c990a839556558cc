"""Dense linear layer for decode-sized batches: a typed wrapper over torch.ops.sagellm and its fake.

dense_linear streams each weight row once and computes all M dot products against it, on every
core, so at small M it runs near the machine's memory bandwidth. Past that it is FMA-bound and a
blocked GEMM (torch.nn.functional.linear) wins; the caller picks. Measured on the 2-core AVX-512
dev machine with cold weights (benchmarks/ops/bench_linear.py): faster than F.linear for fp32 up
to M = 16 (the largest measured) and for bf16 up to M = 4; for bf16 F.linear wins from M ~ 8
(oneDNN uses the bf16 dot-product instructions, this kernel widens to fp32).
"""

from __future__ import annotations

import torch

import sagellm  # noqa: F401  (loads the extension that registers torch.ops.sagellm)


def dense_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = input @ weight.T + bias, accumulated in fp32 and rounded once to the dtype.

    input: [M, K], fp32/fp16/bf16; rows may be strided (innermost dim contiguous).
    weight: [N, K], input's dtype, contiguous (the nn.Linear layout).
    bias: [N], input's dtype, or None.
    out: [M, N], input's dtype (allocated when None), innermost dim contiguous; must not
        overlap input, weight or bias.
    Returns out.
    """
    if out is None:
        out = torch.empty((input.shape[0], weight.shape[0]), dtype=input.dtype, device=input.device)
    torch.ops.sagellm.dense_linear(out, input, weight, bias)
    return out


@torch.library.register_fake("sagellm::dense_linear")
def _dense_linear_fake(out, input, weight, bias) -> None:
    torch._check(input.dim() == 2, lambda: f"input must be 2-d, got {tuple(input.shape)}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == input.shape[1],
        lambda: f"weight has shape {tuple(weight.shape)}; expected [N, {input.shape[1]}]",
    )
    torch._check(
        out.shape == (input.shape[0], weight.shape[0]),
        lambda: f"out has shape {tuple(out.shape)}; expected [{input.shape[0]}, {weight.shape[0]}]",
    )
    if bias is not None:
        torch._check(
            bias.shape == (weight.shape[0],),
            lambda: f"bias has shape {tuple(bias.shape)}; expected [{weight.shape[0]}]",
        )
