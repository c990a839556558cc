"""int8_linear / int4_linear against dequantize-then-matmul (float64), fp8_linear against the
product of its rounded operands, and the quantizers, on every device present.

Tolerances (outputs are O(1): inputs ~ N(0, 1), weights scaled by 1/sqrt(K)):
- fp16 / bf16: the shared table (tests/ops/tolerances.py). The kernels accumulate in fp32; the
  error is the final rounding to the dtype plus, where the weight is rounded to the input's
  dtype first (CUDA: int4 fused kernel, and the dequantize + cuBLAS path), a random-signed
  relative error of 2^-9 (bf16) / 2^-12 (fp16) per weight, which sums to well under one output
  step of the dtype.
- fp32: 1e-5 scaled by sqrt(K / 64) (fp32 accumulation over K terms, as test_linear.py).
- fp8_linear: against reference.fp8_linear (the same per-token e4m3 rounding of the input, the
  rest exact): bf16 table (_scaled_mm rounds its fp32 sum to bf16). Against the unquantized
  product the norm-relative error must stay under 0.1 (e4m3 keeps 3 mantissa bits).
"""

from __future__ import annotations

import math

import pytest
import torch

from sagellm import ops
from sagellm.ops import quant
from sagellm.ops.reference import quant as ref
from tests.ops.tolerances import DTYPES, poisoned, tol

HAVE_CUDA = torch.cuda.is_available() and ops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

# M: one token, a ragged tile, every CUDA token tile (8, 16, 64) and the dequantize + GEMM path.
M_VALUES = [1, 3, 8, 16, 64, 200]
# (N, K): N not a multiple of the 16-row tile; K = 1000 is not a multiple of 16 (CUDA int8 runs
# dequantize + GEMM there), 2064 = 129 * 16 leaves a ragged 64-byte chunk.
NK_INT8 = [(1, 16), (7, 48), (37, 1000), (129, 2064), (300, 4096)]
# K multiples of 128 (every group size), 384 and 1152 an odd number of 128-chunks.
NK_INT4 = [(5, 128), (33, 384), (129, 1152), (300, 4096)]
GROUP_SIZES = [32, 64, 128]


def _tol(dtype: torch.dtype, k: int) -> dict[str, float]:
    if dtype != torch.float32:
        return tol(dtype)
    scale = max(1.0, math.sqrt(k / 64))
    return {"atol": 1e-5 * scale, "rtol": 1e-5 * scale}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input(m, k, dtype, g, device):
    return torch.randn(m, k, generator=g).to(dtype).to(device)


def _bias(n, dtype, g, device, on):
    return torch.randn(n, generator=g).to(dtype).to(device) if on else None


def _int8_weight(n, k, g, device):
    """Every int8 value (-128 included) and scales spread over two octaves."""
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) + 0.5) / (80.0 * math.sqrt(max(k, 1)))
    return q.to(device), s.to(device)


def _int4_weight(n, k, group_size, zeros, g, device):
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    groups = k // group_size
    s = (torch.rand(n, groups, generator=g) + 0.5) / (9.0 * math.sqrt(max(k, 1)))
    z = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8) if zeros else None
    return packed.to(device), s.to(device), (z.to(device) if zeros else None)


def _run_int8(x, q, s, b, out=None):
    out = poisoned(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device) if out is None else out
    result = quant.int8_linear(x, q, s, b, out=out)
    assert result is out
    return out


def _run_int4(x, w, s, z, gs, b, out=None):
    out = poisoned(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device) if out is None else out
    result = quant.int4_linear(x, w, s, z, gs, b, out=out)
    assert result is out
    return out


# ---- int8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", NK_INT8)
@pytest.mark.parametrize("m", M_VALUES)
def test_int8_linear(device, dtype, n, k, m):
    g = _gen(m * 7919 + n * 31 + k)
    x = _input(m, k, dtype, g, device)
    q, s = _int8_weight(n, k, g, device)
    b = _bias(n, dtype, g, device, on=m % 2 == 1)
    out = _run_int8(x, q, s, b)
    torch.testing.assert_close(out, ref.int8_linear(x, q, s, b), **_tol(dtype, k))


# ---- int4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", NK_INT4)
@pytest.mark.parametrize("m", M_VALUES)
def test_int4_linear(device, dtype, n, k, m, group_size, zeros):
    g = _gen(m * 7919 + n * 31 + k + group_size)
    x = _input(m, k, dtype, g, device)
    w, s, z = _int4_weight(n, k, group_size, zeros, g, device)
    b = _bias(n, dtype, g, device, on=(m + group_size) % 3 == 0)
    out = _run_int4(x, w, s, z, group_size, b)
    torch.testing.assert_close(out, ref.int4_linear(x, w, s, z, group_size, b), **_tol(dtype, k))


# ---- layouts, empty sizes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 40])
def test_strided_rows(device, dtype, m):
    # input rows are a column slice of a wider buffer (8 elements in: still 16-byte aligned on
    # CUDA; 3 in: not, copied first), out's rows a slice of a wider buffer.
    g = _gen(m)
    n, k = 70, 256
    q, s = _int8_weight(n, k, g, device)
    w4, s4, z4 = _int4_weight(n, k, 64, True, g, device)
    for start in (8, 3):
        x = _input(m, k + 16, dtype, g, device)[:, start : start + k]
        out_buf = poisoned(m, n + 10, dtype=dtype, device=device)
        out = out_buf[:, 4 : 4 + n]
        _run_int8(x, q, s, None, out=out)
        torch.testing.assert_close(out, ref.int8_linear(x, q, s), **_tol(dtype, k))
        _run_int4(x, w4, s4, z4, 64, None, out=out)
        torch.testing.assert_close(out, ref.int4_linear(x, w4, s4, z4, 64), **_tol(dtype, k))
        assert out_buf[:, :4].isnan().all() and out_buf[:, 4 + n :].isnan().all()


def test_empty_dims(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = _gen(5)
    q, s = _int8_weight(6, 0, g, device)
    x = torch.empty(3, 0, dtype=dtype, device=device)
    b = _bias(6, dtype, g, device, on=True)
    torch.testing.assert_close(_run_int8(x, q, s, b), b.expand(3, 6))
    q, s = _int8_weight(6, 32, g, device)
    assert quant.int8_linear(torch.empty(0, 32, dtype=dtype, device=device), q, s).shape == (0, 6)
    w, s4, _ = _int4_weight(0, 128, 128, False, g, device)
    x = _input(2, 128, dtype, g, device)
    assert quant.int4_linear(x, w, s4).shape == (2, 0)


# ---- bad inputs ------------------------------------------------------------------------------


def test_int8_bad_inputs(device):
    g = _gen(1)
    x = _input(2, 64, torch.float16, g, device)
    q, s = _int8_weight(8, 64, g, device)
    with pytest.raises(RuntimeError, match="weight has shape"):
        quant.int8_linear(x, q[:, :32].contiguous(), s)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        quant.int8_linear(x, q.to(torch.uint8), s)
    with pytest.raises(RuntimeError, match="scales has dtype"):
        quant.int8_linear(x, q, s.half())
    with pytest.raises(RuntimeError, match="scales has shape"):
        quant.int8_linear(x, q, s[:4])
    with pytest.raises(RuntimeError, match="input has dtype"):
        quant.int8_linear(x.to(torch.int32), q, s, out=torch.empty(2, 8, device=device))
    with pytest.raises(RuntimeError, match="bias has dtype"):
        quant.int8_linear(x, q, s, torch.zeros(8, device=device))
    with pytest.raises(RuntimeError, match="out has shape"):
        quant.int8_linear(x, q, s, out=torch.empty(2, 9, dtype=x.dtype, device=device))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        quant.int8_linear(x, q.t().contiguous().t(), s)


def test_int4_bad_inputs(device):
    g = _gen(2)
    x = _input(2, 256, torch.bfloat16, g, device)
    w, s, z = _int4_weight(8, 256, 64, True, g, device)
    with pytest.raises(RuntimeError, match="group_size = 16"):
        quant.int4_linear(x, w, s, z, 16)
    with pytest.raises(RuntimeError, match=r"expected \[N, 128\]"):
        quant.int4_linear(x, w[:, :64].contiguous(), s, z, 64)
    with pytest.raises(RuntimeError, match="not a multiple of group_size"):
        quant.int4_linear(x[:, :96].contiguous(), w[:, :48].contiguous(), s[:, :1], None, 64)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        quant.int4_linear(x, w.to(torch.int8), s, z, 64)
    with pytest.raises(RuntimeError, match="scales has shape"):
        quant.int4_linear(x, w, s[:, :2].contiguous(), z, 64)
    with pytest.raises(RuntimeError, match="zeros has shape"):
        quant.int4_linear(x, w, s, z[:, :3].contiguous(), 64)
    with pytest.raises(RuntimeError, match="zeros has dtype"):
        quant.int4_linear(x, w, s, z.to(torch.int32), 64)
    bad = z.clone()
    bad[3, 1] = 16
    before = ops.cuda_index_checks() if device == "cuda" else None
    if device == "cuda":
        ops.set_cuda_index_checks(True)
    try:
        with pytest.raises(RuntimeError, match=r"zeros\[3, 1\] = 16 is out of range"):
            quant.int4_linear(x, w, s, bad, 64)
    finally:
        if device == "cuda":
            ops.set_cuda_index_checks(before)


@needs_cuda
def test_cuda_device_mismatch():
    g = _gen(3)
    x = _input(2, 64, torch.float16, g, "cuda")
    q, s = _int8_weight(8, 64, g, "cuda")
    with pytest.raises(RuntimeError, match="scales is on cpu"):
        quant.int8_linear(x, q, s.cpu())


def test_opcheck(device):
    g = _gen(4)
    dtype = torch.bfloat16
    x = _input(3, 256, dtype, g, device)
    q, s = _int8_weight(40, 256, g, device)
    out = torch.empty(3, 40, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.sagellm.int8_linear.default, (out, x, q, s, None))
    w, s4, z4 = _int4_weight(40, 256, 128, True, g, device)
    b = _bias(40, dtype, g, device, on=True)
    torch.library.opcheck(torch.ops.sagellm.int4_linear.default, (out, x, w, s4, z4, 128, b))


# ---- CUDA: model shapes, split-K, graphs -----------------------------------------------------

CUDA_SHAPES = [(1, 4096, 4096), (8, 14336, 4096), (16, 4096, 14336), (33, 6144, 4096),
               (64, 1024, 4096), (5, 64, 14336), (100, 4096, 4096)]  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", CUDA_SHAPES)
def test_cuda_model_shapes(dtype, m, n, k):
    g = _gen(m + n + k)
    x = _input(m, k, dtype, g, "cuda")
    q, s = _int8_weight(n, k, g, "cuda")
    b = _bias(n, dtype, g, "cuda", on=True)
    torch.testing.assert_close(_run_int8(x, q, s, b), ref.int8_linear(x, q, s, b), **tol(dtype))
    w, s4, z4 = _int4_weight(n, k, 128, m % 2 == 1, g, "cuda")
    torch.testing.assert_close(
        _run_int4(x, w, s4, z4, 128, b), ref.int4_linear(x, w, s4, z4, 128, b), **tol(dtype)
    )


@needs_cuda
@pytest.mark.parametrize("m", [1, 24])
def test_cuda_graph_capture(m):
    g = _gen(9)
    dtype = torch.bfloat16
    n, k = 512, 1024
    q, s = _int8_weight(n, k, g, "cuda")
    w, s4, z4 = _int4_weight(n, k, 128, True, g, "cuda")
    x = _input(m, k, dtype, g, "cuda")
    out8 = torch.empty(m, n, dtype=dtype, device="cuda")
    out4 = torch.empty(m, n, dtype=dtype, device="cuda")
    quant.int8_linear(x, q, s, out=out8)  # warm up outside the capture
    quant.int4_linear(x, w, s4, z4, 128, out=out4)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quant.int8_linear(x, q, s, out=out8)
        quant.int4_linear(x, w, s4, z4, 128, out=out4)
    x.copy_(_input(m, k, dtype, g, "cuda"))
    out8.fill_(float("nan"))
    out4.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out8, ref.int8_linear(x, q, s), **tol(dtype))
    torch.testing.assert_close(out4, ref.int4_linear(x, w, s4, z4, 128), **tol(dtype))


# ---- quantizers ------------------------------------------------------------------------------


def test_quantize_int8_round_trip():
    w = torch.randn(37, 300, generator=_gen(11))
    w[5] = 0.0
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (37,) and s[5] == 1.0
    assert q.abs().max() <= 127
    err = (ref.dequantize_int8(q, s) - w.double()).abs()
    assert (err <= s.double()[:, None] / 2 + 1e-7).all()
    # the largest element of each row maps to +-127 exactly
    assert (q.abs().amax(dim=1)[torch.arange(37) != 5] == 127).all()


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantize_int4_round_trip(group_size, zero_point):
    w = torch.randn(9, 384, generator=_gen(group_size)) + (0.5 if zero_point else 0.0)
    packed, s, z = quant.quantize_int4(w, group_size, zero_point)
    assert packed.shape == (9, 192) and s.shape == (9, 384 // group_size)
    assert (z is not None) == zero_point
    assert torch.equal(quant.pack_int4(quant.unpack_int4(packed)), packed)
    wd = ref.dequantize_int4(packed, s, z, group_size)
    step = s.double().repeat_interleave(group_size, dim=1)
    # Asymmetric: the zero point is rounded too, so the group's extreme can be clamped by up to
    # one step; symmetric never clamps (|w| / scale <= 7).
    bound = step * (1.0 if zero_point else 0.5)
    assert ((wd - w.double()).abs() <= bound + 1e-6).all()


def test_quantize_int4_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size = 48"):
        quant.quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="not a multiple"):
        quant.quantize_int4(torch.randn(4, 96), 64)


def test_quantize_fp8_weight_round_trip():
    w = torch.randn(32, 64, generator=_gen(12))
    for per_channel in (True, False):
        wq, s = quant.quantize_fp8_weight(w, per_channel=per_channel)
        assert wq.dtype == torch.float8_e4m3fn and s.shape == ((32,) if per_channel else (1,))
        wd = wq.double() * s.double().reshape(-1, 1)
        # e4m3: 3 mantissa bits, relative rounding error <= 2^-4 (normal range)
        assert (
            (wd - w.double()).abs() <= w.double().abs() * 2**-4 + s.double().max() * 2**-9
        ).all()


# ---- fp8 W8A8 --------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (7, 48, 4096), (64, 4096, 1024)])
def test_fp8_linear(device, dtype, m, n, k, per_channel):
    g = _gen(m + n + k)
    x = _input(m, k, dtype, g, device)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    wq, ws = quant.quantize_fp8_weight(w, per_channel=per_channel)
    wq, ws = wq.to(device), ws.to(device)
    b = _bias(n, dtype, g, device, on=m % 2 == 1)
    try:
        y = quant.fp8_linear(x, wq, ws, b)
    except (RuntimeError, NotImplementedError) as e:
        if device == "cpu":
            pytest.skip(f"torch._scaled_mm is not available on this CPU build: {e}")
        raise
    assert y.dtype == dtype and y.shape == (m, n)
    expect = ref.fp8_linear(x, wq, ws, b)
    torch.testing.assert_close(y.double(), expect, atol=2e-2, rtol=1.6e-2)
    exact = x.double() @ w.double().to(device).T + (b.double() if b is not None else 0.0)
    assert (y.double() - exact).norm() / exact.norm() < 0.1


def test_fp8_linear_bad_inputs():
    x = torch.randn(2, 64)
    wq, ws = quant.quantize_fp8_weight(torch.randn(32, 64))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        quant.fp8_linear(x, wq.float(), ws)
    with pytest.raises(ValueError, match="multiples of 16"):
        quant.fp8_linear(x[:, :40], wq[:, :40], ws)
    with pytest.raises(ValueError, match="weight_scale"):
        quant.fp8_linear(x, wq, ws[:3])
