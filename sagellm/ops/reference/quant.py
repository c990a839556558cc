"""Pure references of gguf_linear: the gguf package's dequantizer, then a float64 matmul.

Two references, for two tolerances:
- gguf_linear: dequantize the weight with gguf.quants.dequantize (the reference llama.cpp's
  Python tools use) and multiply the input exactly (float64). The kernel differs from it by the
  rounding of the input to int8 blocks of 32, which quantize_activations_error_bound bounds.
- gguf_linear_q8: the same, but with the input first rounded exactly as the kernel rounds it
  (quantize_activations). Every remaining difference is fp32 rounding in the kernel, ~1e-6 of
  |x| @ |W|^T.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

BLOCK = 32  # activation block

# Byte offsets of each type's fp16 scale fields inside a block (d, and m / dmin where present).
_FP16_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}
# (elements, bytes) per block.
_BLOCKS = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 12: (256, 144),
           13: (256, 176), 14: (256, 210)}  # fmt: skip


def random_gguf_blocks(
    qtype: int,
    n: int,
    k: int,
    generator: torch.Generator,
    log2_scale: tuple[float, float] = (-10, -4),
) -> torch.Tensor:
    """uint8 [N, row_bytes]: random GGUF blocks of type qtype for an [N, K] weight.

    Every byte is random (all packed integers, K-quant sub-scales, Q6_K's int8 scales) except the
    fp16 scale fields, which get finite values of random sign with |value| = 2^u, u uniform in
    log2_scale: random bits there would give NaN, infinity or huge values.
    """
    elems, nbytes = _BLOCKS[qtype]
    blocks = k // elems
    w = torch.randint(0, 256, (n, blocks, nbytes), dtype=torch.uint8, generator=generator)
    for offset in _FP16_FIELDS[qtype]:
        mag = torch.exp2(torch.empty(n, blocks).uniform_(*log2_scale, generator=generator))
        sign = torch.where(torch.rand(n, blocks, generator=generator) < 0.5, -1.0, 1.0)
        w[:, :, offset : offset + 2] = (mag * sign).half().view(torch.uint8).reshape(n, blocks, 2)
    return w.reshape(n, blocks * nbytes).contiguous()


def dequantize_gguf(weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """uint8 [N, row_bytes] GGUF blocks -> float32 [N, K], by gguf.quants.dequantize."""
    w = weight.contiguous().numpy()
    return torch.from_numpy(np.ascontiguousarray(dequantize(w, GGMLQuantizationType(qtype))))


def gguf_dequantize(
    weight: torch.Tensor, qtype: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [R, row_bytes] -> [R, K] in dtype: dequantize_gguf, rounded to nearest-even."""
    return dequantize_gguf(weight.cpu(), qtype).to(device=weight.device, dtype=dtype)


def quantize_activations(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """input [M, K] -> (q float32 [M, K] of integers in [-127, 127], d float32 [M, K / 32]).

    Bit for bit what the kernels compute, in float32: amax = max |x| per block, d = amax / 127,
    q = round-half-even(x * (127 / amax)). A block holding a NaN or an infinity gets q = 0 and
    d = NaN (it makes that row's outputs NaN).
    """
    m, k = input.shape
    x = input.to(torch.float32).reshape(m, k // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1)
    finite = torch.isfinite(x).all(dim=-1)
    d = amax / torch.tensor(127.0, dtype=torch.float32)
    inv = torch.where(amax > 0, torch.tensor(127.0, dtype=torch.float32) / amax, 0.0)
    q = torch.round(x * inv.unsqueeze(-1))
    q = torch.where(finite.unsqueeze(-1), q, 0.0)
    d = torch.where(finite, d, float("nan"))
    return q.reshape(m, k), d


def dequantize_activations(input: torch.Tensor) -> torch.Tensor:
    """input [M, K] -> float64 [M, K]: the values the kernel multiplies, q * d, exactly."""
    q, d = quantize_activations(input)
    m, k = q.shape
    xq = q.to(torch.float64).reshape(m, k // BLOCK, BLOCK) * d.to(torch.float64).unsqueeze(-1)
    return xq.reshape(m, k)


def gguf_linear(
    input: torch.Tensor, weight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """input [M, K] fp32/bf16, weight uint8 [N, row_bytes] -> [M, N] in input's dtype:
    input @ dequantize(weight).T + bias, the product in float64."""
    w = dequantize_gguf(weight, qtype).to(torch.float64)
    y = input.to(torch.float64) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(input.dtype)


def gguf_linear_q8(
    input: torch.Tensor, weight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """As gguf_linear with the input rounded as the kernel rounds it; float64 [M, N], unrounded."""
    w = dequantize_gguf(weight, qtype).to(torch.float64)
    y = dequantize_activations(input) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def quantize_activations_error_bound(input: torch.Tensor, weight_f: torch.Tensor) -> torch.Tensor:
    """float64 [M, N]: a bound on |gguf_linear_q8 - gguf_linear| (before output rounding).

    Rounding x * 127 / amax to an integer moves each x by at most amax / 254, so output n moves
    by at most sum over blocks b of (amax_b / 254) * sum_{i in b} |W[n, i]|. weight_f is the
    dequantized weight [N, K].
    """
    m, k = input.shape
    x = input.to(torch.float64).reshape(m, k // BLOCK, BLOCK)
    step = x.abs().amax(dim=-1) / 254.0
    wsum = weight_f.to(torch.float64).abs().reshape(-1, k // BLOCK, BLOCK).sum(dim=-1)
    return step @ wsum.T


# ---- weight-only int8 / int4 and FP8 W8A8 ----------------------------------------------------


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [N, K], fp32 [N] -> float64 [N, K]: weight * scales[:, None]."""
    return weight.to(torch.float64) * scales.to(torch.float64)[:, None]


def dequantize_int4(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """uint8 [N, K / 2] packed nibbles -> float64 [N, K]: (q - zeros) * scales per group."""
    n = weight.shape[0]
    q = torch.stack((weight & 15, weight >> 4), dim=-1).reshape(n, -1).to(torch.float64)
    z = zeros.to(torch.float64) if zeros is not None else torch.full_like(scales, 8.0).double()
    s = scales.to(torch.float64)
    return (q - z.repeat_interleave(group_size, dim=1)) * s.repeat_interleave(group_size, dim=1)


def _linear(input, w, bias):
    y = input.to(torch.float64) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(input.dtype)


def int8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """input [M, K] @ dequantize_int8(weight [N, K], scales [N]).T + bias -> [M, N], computed in
    float64 and rounded once to input's dtype."""
    return _linear(input, dequantize_int8(weight, scales).to(input.device), bias)


def int4_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """input [M, K] @ dequantize_int4(weight [N, K / 2], ...).T + bias -> [M, N], float64 then
    rounded once to input's dtype."""
    w = dequantize_int4(weight, scales, zeros, group_size).to(input.device)
    return _linear(input, w, bias)


def fp8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The product fp8_linear computes, in float64 [M, N] (unrounded): input rounded per token to
    e4m3 as the wrapper does (max |x| / 448 scale), times the e4m3 weight * weight_scale."""
    x = input.to(torch.float32)
    amax = x.abs().amax(dim=1, keepdim=True)
    xs = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    xq = (x / xs).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float64) * xs.double()
    w = weight.to(torch.float64) * weight_scale.to(torch.float64).reshape(-1, 1)
    y = xq @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
