"""dense_linear against the fp64 pure-torch reference, on every device present (the reference
runs on the kernel's device). On CUDA the op is cuBLAS through ATen, so the CUDA cases check the
wiring (strided out, bias, empty dims, validation) at model-sized shapes too.

Tolerance: fp16/bf16 use the shared table (the error is the final rounding to the dtype; the
kernel accumulates in fp32). fp32 has no such rounding to hide behind: the kernel's own fp32
accumulation error grows with the reduction length K (about sqrt(K) steps of 2^-24 for a
random-walk sum of O(1) partial sums), so fp32 atol and rtol are the table's 1e-5 scaled by
sqrt(K / 64), never below 1e-5: 1.5e-4 at K = 14336. Inputs are scaled so every output is O(1).
"""

from __future__ import annotations

import math

import pytest
import torch

from sagellm import ops
from sagellm.ops import linear
from sagellm.ops.reference import linear as ref
from tests.ops.tolerances import DTYPES, poisoned, tol

HAVE_CUDA = torch.cuda.is_available() and ops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

M_VALUES = [1, 2, 3, 4, 5, 8, 16, 33]
# (N, K): each of 1, 7, 576, 1000, 1536, 4097 on both sides, N not a multiple of the 4-row tile,
# K not a multiple of the vector width, and N * K large enough that two threads share the rows.
NK = [(1, 1), (1, 576), (1, 1536), (7, 7), (7, 4097), (576, 1000), (1000, 576), (1536, 576),
      (4097, 7), (4097, 576)]  # fmt: skip


def _tol(dtype: torch.dtype, k: int) -> dict[str, float]:
    if dtype != torch.float32:
        return tol(dtype)
    scale = max(1.0, math.sqrt(k / 64))
    return {"atol": 1e-5 * scale, "rtol": 1e-5 * scale}


def _inputs(m, n, k, dtype, *, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / math.sqrt(max(k, 1))).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, w, b


def _check(x, w, b):
    out = poisoned(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    result = linear.dense_linear(x, w, b, out=out)
    assert result is out
    torch.testing.assert_close(out, ref.dense_linear(x, w, b), **_tol(x.dtype, x.shape[1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("m", M_VALUES)
def test_dense_linear(device, dtype, n, k, m):
    _check(*_inputs(m, n, k, dtype, seed=m * 7919 + n * 31 + k, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("m", [1, 5])
def test_dense_linear_without_bias(device, dtype, n, k, m):
    _check(*_inputs(m, n, k, dtype, bias=False, seed=m * 7919 + n * 31 + k, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(7, 7), (1000, 576), (33, 4097)])
@pytest.mark.parametrize("m", [1, 3, 5, 16])
def test_dense_linear_every_isa(cpu_isa, dtype, n, k, m):
    _check(*_inputs(m, n, k, dtype, bias=m % 2 == 1, seed=m + n + k))


@pytest.mark.parametrize("m", [1, 4, 5])
def test_dense_linear_fp32_long_reduction(device, m):
    # Llama-3-8B's down projection length: the case the K-scaled fp32 tolerance is for.
    _check(*_inputs(m, 33, 14336, torch.float32, seed=m, device=device))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (257, 14336, 4096), (4099, 1024, 5128)])
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_model_sizes(dtype, m, n, k, bias):
    _check(*_inputs(m, n, k, dtype, bias=bias, seed=m + n, device="cuda"))


def _check_strided_rows(dtype, device):
    # input rows are a column slice of a wider buffer (e.g. a view of a fused qkv output), and
    # out's rows are a slice of a wider buffer too: both are read/written in place.
    x_buf, w, b = _inputs(5, 1000, 600, dtype, seed=3, device=device)
    x = x_buf[:, 11:587]
    w = w[:, :576].contiguous()
    out_buf = poisoned(5, 1010, dtype=dtype, device=device)
    out = out_buf[:, 3:1003]
    linear.dense_linear(x, w, b, out=out)
    torch.testing.assert_close(out, ref.dense_linear(x, w, b), **_tol(dtype, 576))
    assert out_buf[:, :3].isnan().all() and out_buf[:, 1003:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_linear_strided_rows(device, dtype):
    _check_strided_rows(dtype, device)


def test_dense_linear_strided_rows_every_isa(cpu_isa):
    _check_strided_rows(torch.bfloat16, "cpu")


def test_dense_linear_broadcast_and_non_contiguous_input(device):
    x, w, b = _inputs(1, 100, 64, torch.float32, seed=4, device=device)
    expanded = x.expand(6, 64)  # row stride 0
    torch.testing.assert_close(
        linear.dense_linear(expanded, w, b), ref.dense_linear(expanded, w, b), **_tol(x.dtype, 64)
    )
    strided = torch.randn(4, 128, device=device)[:, ::2]  # innermost stride 2: copied first
    torch.testing.assert_close(
        linear.dense_linear(strided, w, b), ref.dense_linear(strided, w, b), **_tol(x.dtype, 64)
    )


def test_dense_linear_empty_dims(device):
    x, w, b = _inputs(3, 7, 0, torch.float32, device=device)
    torch.testing.assert_close(linear.dense_linear(x, w, b), b.expand(3, 7))
    torch.testing.assert_close(linear.dense_linear(x, w), torch.zeros(3, 7, device=device))
    x, w, b = _inputs(0, 7, 5, torch.float32, device=device)
    assert linear.dense_linear(x, w, b).shape == (0, 7)


def _bad(out, x, w, b, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sagellm.dense_linear(out, x, w, b)


def test_dense_linear_rejects_bad_inputs(device):
    x, w, b = _inputs(4, 8, 16, torch.float32, device=device)
    out = torch.empty(4, 8, device=device)

    def randn(*shape):
        return torch.randn(*shape, device=device)

    _bad(out, x.int(), w, b, "input has dtype")
    _bad(out, x, w.double(), b, "weight has dtype")
    _bad(out, x, w, b.half(), "bias has dtype")
    _bad(out.half(), x, w, b, "out has dtype")
    _bad(out, x.view(2, 2, 16), w, b, "input must be 2-d")
    _bad(out, x, w.view(8, 16, 1), b, "weight must be 2-d")
    _bad(out, x, w[:, :15], b, r"weight has shape \[8, 15\]")
    _bad(out, x, randn(16, 8).t(), b, "weight .* must be contiguous")
    _bad(randn(4, 9), x, w, b, r"out has shape \[4, 9\]")
    _bad(randn(8, 4).t(), x, w, b, "out .* must be contiguous in its last dim")
    _bad(out, x, w, randn(9), r"bias has shape \[9\]")
    _bad(out, x, w, randn(8, 1), "bias must be 1-d")
    _bad(out, x, w, randn(16)[::2], "bias must be contiguous")
    square_x, square_w, _ = _inputs(4, 16, 16, torch.float32, device=device)
    _bad(square_x, square_x, square_w, None, "out overlaps input")
    _bad(square_w[:4], square_x, square_w, None, "out overlaps weight")


@needs_cuda
@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    x, w, b = _inputs(4, 8, 16, torch.float32, device="cuda")
    _bad(torch.empty(4, 8, device="cuda"), x, w.cpu(), b, "weight is on cpu but input is on cuda")
    _bad(torch.empty(4, 8), x, w, b, "out is on cpu but input is on cuda")
    _bad(torch.empty(4, 8, device="cuda"), x, w, b.cpu(), "bias is on cpu but input is on cuda")


def test_opcheck(device):
    x, w, b = _inputs(3, 20, 24, torch.float32, device=device)
    op = torch.ops.sagellm.dense_linear.default
    torch.library.opcheck(op, (torch.empty(3, 20, device=device), x, w, b))
    torch.library.opcheck(op, (torch.empty(3, 20, device=device), x, w, None))
