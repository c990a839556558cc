"""GGUF block-quantized linear layers: a typed wrapper over torch.ops.sagellm and its fake.

gguf_linear multiplies by a weight kept in its GGUF file format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K, Q5_K, Q6_K), never dequantized to a dense copy. On the CPU the input rows are quantized on
the fly to int8 blocks of 32 (one fp32 scale each, as llama.cpp's Q8_0/Q8_1 activations), and
the weight blocks are unpacked in registers for integer dot products: AVX-512 VNNI, AVX2, or a
scalar fallback, chosen with the other CPU kernels (sagellm.ops.set_cpu_isa). The result equals
dequantize-then-matmul up to that activation rounding (see sagellm.ops.reference.quant).
On CUDA the activations are not rounded: a GEMV decodes the blocks in registers (M <= 16), or the
weight is dequantized to a scratch in the input's dtype for cuBLAS (larger M). gguf_dequantize
expands rows of such a weight (an embedding lookup of a quantized table) on the weight's device.

int8_linear (W8A16, per-channel scales) and int4_linear (W4A16, group scales, optional zero
points) keep a weight-only quantized weight and compute in the input's precision; on CUDA a
fused tensor-core kernel streams the weight once for M <= 64. fp8_linear (W8A8, e4m3) quantizes
the activations per token and multiplies through torch._scaled_mm. The quantizers here produce
the layouts these ops take.
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
    Returns out. On the CPU, activations are rounded to int8 blocks of 32 first: relative error
    about 1e-3 (at most ~1e-2) against the fp32 product with the dequantized weight. On CUDA
    (where input may also be fp16) they are not: fp32 accumulation of the exact dequantized
    weight for M <= 16, else the weight rounded to input's dtype and multiplied by cuBLAS.
    """
    if out is None:
        out = torch.empty((input.shape[0], weight.shape[0]), dtype=input.dtype, device=input.device)
    torch.ops.sagellm.gguf_linear(out, input, weight, qtype, bias)
    return out


def gguf_dequantize(
    weight: torch.Tensor,
    qtype: int,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of GGUF blocks as dense values, on weight's device (CPU or CUDA).

    weight: uint8 [R, gguf_row_bytes(qtype, K)], contiguous (e.g. rows picked from a table with
        index_select).
    qtype: the GGML type id, a key of GGUF_BLOCKS.
    dtype: float32, float16 or bfloat16 of the out allocated when out is None.
    out: [R, K], innermost dim contiguous, on weight's device; must not overlap weight.
    Returns out: gguf.quants.dequantize's float32 values bit for bit, rounded to nearest-even for
    float16 / bfloat16.
    """
    if out is None:
        if qtype not in GGUF_BLOCKS:
            raise ValueError(f"qtype = {qtype} is not a GGML type gguf_dequantize supports")
        name, elems, nbytes = GGUF_BLOCKS[qtype]
        if weight.dim() != 2 or weight.shape[1] % nbytes != 0:
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}; expected [R, row_bytes] with row_bytes "
                f"a multiple of the {name} block size {nbytes}"
            )
        k = weight.shape[1] // nbytes * elems
        out = torch.empty((weight.shape[0], k), dtype=dtype, device=weight.device)
    torch.ops.sagellm.gguf_dequantize(out, weight, qtype)
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


# ---- weight-only int8 / int4 (W8A16, W4A16) and FP8 W8A8 -------------------------------------

INT4_GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def int8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = input @ (weight * scales[:, None]).T + bias, the weight kept as int8.

    input: [M, K], fp32, fp16 or bf16 (CUDA: fp16/bf16 run the fused tensor-core kernel up to
        M = 64 and dequantize + cuBLAS beyond; fp32 always takes the dequantize + cuBLAS path);
        innermost dim contiguous, rows may be strided.
    weight: int8 [N, K], contiguous (per-output-channel symmetric, see quantize_int8).
    scales: fp32 [N].
    bias: [N], input's dtype, or None.
    out: [M, N], input's dtype (allocated when None), innermost dim contiguous; must not
        overlap an operand.
    Returns out. Accumulation is fp32; the only roundings are of the products' sum to out's
    dtype (and, on CUDA for M > 64 or int8 K % 16 != 0, of the dequantized weight to input's
    dtype).
    """
    if out is None:
        out = torch.empty((input.shape[0], weight.shape[0]), dtype=input.dtype, device=input.device)
    torch.ops.sagellm.int8_linear(out, input, weight, scales, bias)
    return out


def int4_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = input @ W.T + bias with W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],
    g = k // group_size, the weight kept as packed 4-bit values.

    input: [M, K], fp32, fp16 or bf16 (CUDA paths as int8_linear); innermost dim contiguous.
    weight: uint8 [N, K / 2], contiguous: byte j of row n holds q[n, 2j] in its low nibble and
        q[n, 2j + 1] in its high nibble (see quantize_int4).
    scales: fp32 [N, K / group_size].
    zeros: uint8 [N, K / group_size] with values 0..15, or None for 8 (symmetric).
    group_size: 32, 64 or 128; divides K.
    bias: [N], input's dtype, or None.
    out: [M, N], input's dtype (allocated when None), innermost dim contiguous.
    Returns out. On CUDA with fp16/bf16 and M <= 64 each (q - z) * s is rounded to input's dtype
    before the fp32 accumulation (relative error 2^-9 bf16, 2^-12 fp16 per weight).
    """
    if out is None:
        out = torch.empty((input.shape[0], weight.shape[0]), dtype=input.dtype, device=input.device)
    torch.ops.sagellm.int4_linear(out, input, weight, scales, zeros, group_size, bias)
    return out


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q int8 [N, K], scales fp32 [N]), per output channel, symmetric:
    scale = max |w| / 127 (1 for an all-zero row), q = round-half-even(w / scale) in [-127, 127]."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-d float tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    w = weight.to(torch.float32)
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] with values 0..15 -> uint8 [N, K / 2] (k = 2j low nibble, 2j + 1 high)."""
    if q.dim() != 2 or q.shape[1] % 2 != 0:
        raise ValueError(f"q must be [N, K] with K even, got {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> uint8 [N, K] of 4-bit values (the inverse of pack_int4)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128, zero_point: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight [N, K] float -> (packed uint8 [N, K / 2], scales fp32 [N, K / group_size],
    zeros uint8 [N, K / group_size] or None), groups of group_size along K.

    Symmetric (zero_point=False, zero 8): scale = max |w| / 7, q = round-half-even(w / scale) + 8
    in [1, 15]. Asymmetric: over the group's range widened to include 0, scale = (max - min) / 15,
    zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15). An all-zero group gets
    scale 1.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-d float tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    n, k = weight.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size = {group_size}; expected one of {INT4_GROUP_SIZES}")
    if k % group_size != 0:
        raise ValueError(f"K = {k} is not a multiple of group_size = {group_size}")
    w = weight.to(torch.float32).reshape(n, k // group_size, group_size)
    if zero_point:
        lo = w.amin(dim=-1).clamp(max=0.0)
        hi = w.amax(dim=-1).clamp(min=0.0)
        scales = (hi - lo) / 15.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zeros = torch.round(-lo / scales).clamp_(0, 15)
        q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp_(0, 15)
        zeros_u8: torch.Tensor | None = zeros.to(torch.uint8).contiguous()
    else:
        amax = w.abs().amax(dim=-1)
        scales = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        q = (torch.round(w / scales[..., None]) + 8).clamp_(0, 15)
        zeros_u8 = None
    packed = pack_int4(q.reshape(n, k).to(torch.uint8))
    return packed, scales.contiguous(), zeros_u8


def quantize_fp8_weight(
    weight: torch.Tensor, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (float8_e4m3fn [N, K], scale fp32 [N] or [1]): scale = max |w| / 448
    per output channel (or over the tensor), w / scale rounded to e4m3 (round to nearest even)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-d float tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    w = weight.to(torch.float32)
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    wq = (w / (scale[:, None] if per_channel else scale)).clamp_(-FP8_MAX, FP8_MAX)
    return wq.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def quantize_fp8_activations(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """input [M, K] -> (float8_e4m3fn [M, K], scale fp32 [M, 1]): per-token dynamic scaling,
    scale = max |x| / 448 over the row (1 for an all-zero row)."""
    x = input.to(torch.float32)
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 W8A8: input rows quantized per token to e4m3 (quantize_fp8_activations), multiplied
    with the e4m3 weight by torch._scaled_mm with row-wise scales, fp32 accumulation.

    input: [M, K], fp32, fp16 or bf16. weight: float8_e4m3fn [N, K] (quantize_fp8_weight).
    weight_scale: fp32 [N] (per channel) or [1] (per tensor; broadcast to [N]).
    bias: [N] or None, added in input's dtype. K and N must be multiples of 16 (_scaled_mm).
    Returns [M, N] in input's dtype. _scaled_mm's row-wise form produces bf16, so fp16 / fp32
    outputs are rounded to bf16 first.
    """
    if input.dim() != 2:
        raise ValueError(f"input must be 2-d [M, K], got shape {tuple(input.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(
            f"weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}"
        )
    m, k = input.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [N, {k}]")
    if k % 16 != 0 or n % 16 != 0:
        raise ValueError(f"fp8_linear needs K = {k} and N = {n} to be multiples of 16")
    if weight_scale.dtype != torch.float32 or weight_scale.shape not in ((n,), (1,)):
        raise ValueError(
            f"weight_scale has {weight_scale.dtype} {tuple(weight_scale.shape)}; "
            f"expected float32 [{n}] or [1]"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected [{n}]")
    w_scale = weight_scale.reshape(1, -1).expand(1, n).contiguous()
    return fp8_linear_prepared(input, weight.t(), w_scale, bias)


def fp8_linear_prepared(
    input: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale_row: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp8_linear without its checks, for a layer that prepared its operands once: weight_t is
    weight.t() ([K, N] view of the e4m3 [N, K] weight), weight_scale_row fp32 [1, N] contiguous."""
    xq, x_scale = quantize_fp8_activations(input)
    y = torch._scaled_mm(
        xq, weight_t, scale_a=x_scale, scale_b=weight_scale_row, out_dtype=torch.bfloat16
    ).to(input.dtype)
    if bias is not None:
        y = y + bias.to(input.dtype)
    return y


def _check_int_linear_fake(out, input, n):
    torch._check(input.dim() == 2, lambda: f"input must be 2-d, got {tuple(input.shape)}")
    torch._check(
        out.shape == (input.shape[0], n),
        lambda: f"out has shape {tuple(out.shape)}; expected [{input.shape[0]}, {n}]",
    )


@torch.library.register_fake("sagellm::int8_linear")
def _int8_linear_fake(out, input, weight, scales, bias) -> None:
    torch._check(weight.dtype == torch.int8, lambda: f"weight has dtype {weight.dtype}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == input.shape[1],
        lambda: f"weight has shape {tuple(weight.shape)}; expected [N, {input.shape[1]}]",
    )
    torch._check(scales.shape == (weight.shape[0],), lambda: f"scales {tuple(scales.shape)}")
    _check_int_linear_fake(out, input, weight.shape[0])


@torch.library.register_fake("sagellm::int4_linear")
def _int4_linear_fake(out, input, weight, scales, zeros, group_size, bias) -> None:
    torch._check(group_size in INT4_GROUP_SIZES, lambda: f"group_size = {group_size}")
    torch._check(weight.dtype == torch.uint8, lambda: f"weight has dtype {weight.dtype}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] * 2 == input.shape[1],
        lambda: f"weight has shape {tuple(weight.shape)}; expected [N, {input.shape[1] // 2}]",
    )
    groups = input.shape[1] // group_size
    torch._check(scales.shape == (weight.shape[0], groups), lambda: f"scales {tuple(scales.shape)}")
    if zeros is not None:
        torch._check(zeros.shape == scales.shape, lambda: f"zeros {tuple(zeros.shape)}")
    _check_int_linear_fake(out, input, weight.shape[0])


@torch.library.register_fake("sagellm::gguf_dequantize")
def _gguf_dequantize_fake(out, weight, qtype) -> None:
    torch._check(qtype in GGUF_BLOCKS, lambda: f"qtype = {qtype} is not supported")
    torch._check(weight.dtype == torch.uint8, lambda: f"weight has dtype {weight.dtype}")
    torch._check(weight.dim() == 2 and out.dim() == 2, lambda: "weight and out must be 2-d")
    _, elems, nbytes = GGUF_BLOCKS[qtype]
    torch._check(
        out.shape[0] == weight.shape[0]
        and out.shape[1] % elems == 0
        and weight.shape[1] * elems == out.shape[1] * nbytes,
        lambda: (
            f"out has shape {tuple(out.shape)}; weight {tuple(weight.shape)} needs "
            f"[{weight.shape[0]}, row_bytes / {nbytes} * {elems}]"
        ),
    )
