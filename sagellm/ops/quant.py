"""GGUF block-quantized linear layers: a typed wrapper over torch.ops.sagellm and its fake.

gguf_linear multiplies by a weight kept in its GGUF file format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K, Q5_K, Q6_K), never dequantized to a dense copy. On the CPU the input rows are quantized on
the fly to int8 blocks of 32 (one fp32 scale each, as llama.cpp's Q8_0/Q8_1 activations), and
the weight blocks are unpacked in registers for integer dot products: AVX-512 VNNI, AVX2, or a
scalar fallback, chosen with the other CPU kernels (sagellm.ops.set_cpu_isa). The result equals
dequantize-then-matmul up to that activation rounding (see sagellm.ops.reference.quant).
"""

from __future__ import annotations

import functools

import torch

from sagellm import _C  # loads the extension that registers torch.ops.sagellm

# GGML type id -> (name, elements per block, bytes per block), as in ggml.h and gguf-py.
GGUF_BLOCKS: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}


def gguf_row_bytes(qtype: int, k: int) -> int:
    """Bytes of one weight row of k elements in GGML type qtype; ValueError if k does not fit."""
    if qtype not in GGUF_BLOCKS:
        raise ValueError(f"qtype = {qtype} is not a GGML type gguf_linear supports: {_supported()}")
    name, elems, nbytes = GGUF_BLOCKS[qtype]
    if k < 0 or k % elems != 0:
        raise ValueError(f"K = {k} is not a multiple of the {name} block size {elems}")
    return k // elems * nbytes


def gguf_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    qtype: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = input @ dequantize(weight, qtype).T + bias, with the weight left quantized.

    input: [M, K], fp32 or bf16; rows may be strided (innermost dim contiguous).
    weight: uint8 [N, gguf_row_bytes(qtype, K)], contiguous: row n is the K / block_elems GGUF
        blocks of output n exactly as stored in the .gguf file.
    qtype: the GGML type id, a key of GGUF_BLOCKS.
    bias: [N], input's dtype, or None.
    out: [M, N], input's dtype (allocated when None), innermost dim contiguous; must not
        overlap input, weight or bias.
    Returns out. Activations are rounded to int8 blocks of 32 first: relative error about
    1e-3 (at most ~1e-2) against the fp32 product with the dequantized weight.
    """
    if out is None:
        out = torch.empty((input.shape[0], weight.shape[0]), dtype=input.dtype, device=input.device)
    torch.ops.sagellm.gguf_linear(out, input, weight, qtype, bias)
    return out


@functools.cache
def _cpu_has_avx512_vnni() -> bool:
    # The same test the C++ entry makes with CPUID (quant_entry.cpp); /proc/cpuinfo lists the
    # flags the kernel exposes to us.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_vnni" in line.split()
    except OSError:
        pass
    return False


def gguf_kernel(qtype: int) -> str:
    """Which CPU kernel gguf_linear runs for qtype now, e.g. "Q4_1 x int8 (avx512-vnni)"."""
    if qtype not in GGUF_BLOCKS:
        raise ValueError(f"qtype = {qtype} is not a GGML type gguf_linear supports: {_supported()}")
    isa = _C.cpu_isa()
    if isa == "avx512":
        isa = "avx512-vnni" if _cpu_has_avx512_vnni() else "avx2"
    return f"{GGUF_BLOCKS[qtype][0]} x int8 ({isa})"


def _supported() -> str:
    return ", ".join(f"{name}={t}" for t, (name, _, _) in GGUF_BLOCKS.items())


@torch.library.register_fake("sagellm::gguf_linear")
def _gguf_linear_fake(out, input, weight, qtype, bias) -> None:
    torch._check(qtype in GGUF_BLOCKS, lambda: f"qtype = {qtype} is not supported")
    torch._check(input.dim() == 2, lambda: f"input must be 2-d, got {tuple(input.shape)}")
    torch._check(weight.dtype == torch.uint8, lambda: f"weight has dtype {weight.dtype}")
    _, elems, nbytes = GGUF_BLOCKS[qtype]
    torch._check(input.shape[1] % elems == 0, lambda: f"K = {input.shape[1]} % {elems} != 0")
    torch._check(
        weight.dim() == 2 and weight.shape[1] * elems == input.shape[1] * nbytes,
        lambda: f"weight has shape {tuple(weight.shape)}; expected [N, K / {elems} * {nbytes}]",
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
