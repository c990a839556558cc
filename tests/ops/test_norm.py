"""rms_norm and fused_add_rms_norm against the pure-torch reference (HF LlamaRMSNorm rounding), on
every device present; the reference runs on the same device as the kernel."""

from __future__ import annotations

import pytest
import torch

from sagellm import ops
from sagellm.ops import norm
from sagellm.ops.reference import norm as ref
from tests.ops.tolerances import DTYPES, poisoned, tol

HAVE_CUDA = torch.cuda.is_available() and ops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

HIDDEN = [1, 7, 576, 4097]
ROWS = [0, 1, 5]
EPS = 1e-6
# CUDA: model sizes (16-byte path), 5120 + 8 and 4097 (element-wise path), one row longer than
# the registers hold (40000: rms_norm re-reads its tail), one per-head size (128).
CUDA_HIDDEN = [128, 4096, 5128, 14336, 4097, 40000]
CUDA_ROWS = [1, 3, 67, 1031]


def _inputs(rows, hidden, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1.0 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
    return x.to(device), w.to(device)


def _check_rms_norm(rows, hidden, dtype, device, seed):
    x, w = _inputs(rows, hidden, dtype, seed=seed, device=device)
    out = poisoned(rows, hidden, dtype=dtype, device=device)
    norm.rms_norm(x, w, EPS, out=out)
    torch.testing.assert_close(out, ref.rms_norm(x, w, EPS), **tol(dtype))


def _check_fused(rows, hidden, dtype, device, seed):
    x, w = _inputs(rows, hidden, dtype, seed=seed, device=device)
    residual = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed + 1))
    residual = residual.to(dtype).to(device)
    expected, expected_residual = ref.fused_add_rms_norm(x, residual, w, EPS)
    norm.fused_add_rms_norm(x, residual, w, EPS)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(x, expected, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(device, dtype, hidden, rows):
    _check_rms_norm(rows, hidden, dtype, device, seed=hidden + rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_fused_add_rms_norm(device, dtype, hidden, rows):
    _check_fused(rows, hidden, dtype, device, seed=hidden * 3 + rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 576, 4097])
def test_every_isa(cpu_isa, dtype, hidden):
    _check_rms_norm(5, hidden, dtype, "cpu", seed=hidden)
    _check_fused(5, hidden, dtype, "cpu", seed=hidden + 1)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", CUDA_HIDDEN)
@pytest.mark.parametrize("rows", CUDA_ROWS)
def test_cuda_model_sizes(dtype, hidden, rows):
    _check_rms_norm(rows, hidden, dtype, "cuda", seed=hidden + rows)
    # 20480: longer than the fused kernel keeps in registers (it re-reads its tail).
    _check_fused(rows, 20480 if hidden == 40000 else hidden, dtype, "cuda", seed=hidden - rows)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large(dtype):
    _check_rms_norm(8192, 4096, dtype, "cuda", seed=1)
    _check_fused(8191, 4096, dtype, "cuda", seed=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_view_of_qkv(device, dtype):
    # q/k norm (Qwen3): rows are heads of a fused qkv buffer, two strided levels.
    tokens, heads, kv_heads, d = 5, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype).to(device)
    q = qkv[:, : heads * d].view(tokens, heads, d)
    w = (torch.rand(d).to(dtype) + 0.5).to(device)
    expected = ref.rms_norm(q, w, EPS)
    before = qkv.clone()
    norm.rms_norm(q, w, EPS, out=q)  # in place, through the strided view
    torch.testing.assert_close(q, expected, **tol(dtype))
    assert torch.equal(qkv[:, heads * d :], before[:, heads * d :])


def test_rms_norm_input_with_three_strided_levels(device):
    # Leading dims that do not collapse into two levels: the input is copied first.
    base = torch.randn(3, 4, 5, 64, device=device)
    x = base[:, ::2, ::2]
    w = torch.rand(64, device=device) + 0.5
    out = norm.rms_norm(x, w, EPS)
    torch.testing.assert_close(out, ref.rms_norm(x, w, EPS), **tol(torch.float32))


@pytest.mark.parametrize("offset", [0, 3])
def test_rms_norm_unaligned_rows(device, offset):
    # Rows that start off a 16-byte boundary take the element-wise path on CUDA.
    big = torch.randn(7, 4096 + 8).to(torch.bfloat16).to(device)
    x = big[:, offset : offset + 4096]
    w = (torch.rand(4096) + 0.5).to(torch.bfloat16).to(device)
    out_big = poisoned(7, 4096 + 8, dtype=torch.bfloat16, device=device)
    out = out_big[:, offset : offset + 4096]
    norm.rms_norm(x, w, EPS, out=out)
    torch.testing.assert_close(out, ref.rms_norm(x, w, EPS), **tol(torch.bfloat16))
    assert out_big[:, :offset].isnan().all() and out_big[:, offset + 4096 :].isnan().all()


def test_rms_norm_matches_transformers_bf16(device):
    transformers = pytest.importorskip("transformers")
    layer = transformers.models.llama.modeling_llama.LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(576) + 0.5)
    layer = layer.to(torch.bfloat16).to(device)
    x = torch.randn(9, 576).to(torch.bfloat16).to(device)
    with torch.no_grad():
        expected = layer(x)
    out = norm.rms_norm(x, layer.weight.detach(), 1e-5)
    # Same rounding points: at most one bf16 step apart (rsqrt vs 1/sqrt rounding).
    torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)
    assert (out != expected).float().mean() < 0.01


def test_fused_add_rms_norm_strided_rows(device):
    big_x = torch.randn(6, 200).to(torch.bfloat16).to(device)
    big_r = torch.randn(6, 300).to(torch.bfloat16).to(device)
    x, r = big_x[:, 10:138], big_r[:, :128]
    w = (torch.rand(128).to(torch.bfloat16) + 0.5).to(device)
    expected, expected_residual = ref.fused_add_rms_norm(x, r, w, EPS)
    untouched = big_x[:, 138:].clone()
    norm.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(r, expected_residual)
    torch.testing.assert_close(x, expected, **tol(torch.bfloat16))
    assert torch.equal(big_x[:, 138:], untouched)


def test_rms_norm_bad_inputs(device):
    x, w = _inputs(3, 16, torch.float32, device=device)
    out = torch.empty(3, 16, device=device)

    def empty(*shape, **kw):
        return torch.empty(*shape, device=device, **kw)

    with pytest.raises(RuntimeError, match="input"):
        torch.ops.sagellm.rms_norm(out.int(), x.int(), w.int(), EPS)
    with pytest.raises(RuntimeError, match="weight"):
        norm.rms_norm(x, w.half(), EPS)
    with pytest.raises(RuntimeError, match="weight"):
        norm.rms_norm(x, torch.ones(15, device=device), EPS)
    with pytest.raises(RuntimeError, match="out"):
        norm.rms_norm(x, w, EPS, out=empty(3, 15))
    with pytest.raises(RuntimeError, match="out"):
        norm.rms_norm(x, w, EPS, out=empty(3, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out"):
        norm.rms_norm(x, w, EPS, out=empty(16, 3).t())
    with pytest.raises(RuntimeError, match="epsilon"):
        norm.rms_norm(x, w, -1.0)
    with pytest.raises(RuntimeError, match="input"):
        norm.rms_norm(torch.tensor(1.0, device=device), torch.ones(1, device=device), EPS)


def test_fused_add_rms_norm_bad_inputs(device):
    x, w = _inputs(3, 16, torch.float32, device=device)

    def zeros(*shape, **kw):
        return torch.zeros(*shape, device=device, **kw)

    with pytest.raises(RuntimeError, match="residual"):
        norm.fused_add_rms_norm(x, zeros(3, 17), w, EPS)
    with pytest.raises(RuntimeError, match="residual"):
        norm.fused_add_rms_norm(x, zeros(3, 16, dtype=torch.float16), w, EPS)
    with pytest.raises(RuntimeError, match="residual"):
        norm.fused_add_rms_norm(x, zeros(16, 3).t(), w, EPS)
    with pytest.raises(RuntimeError, match="weight"):
        norm.fused_add_rms_norm(x, zeros(3, 16), torch.ones(8, device=device), EPS)
    with pytest.raises(RuntimeError, match="input"):
        norm.fused_add_rms_norm(x.double(), zeros(3, 16).double(), w.double(), EPS)


@needs_cuda
@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    x, w = _inputs(3, 16, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight is on cpu but input is on cuda"):
        norm.rms_norm(x, w.cpu(), EPS)
    with pytest.raises(RuntimeError, match=r"residual is on cpu but input is on cuda"):
        norm.fused_add_rms_norm(x, torch.zeros(3, 16), w, EPS)


def test_opcheck(device):
    x, w = _inputs(4, 32, torch.float32, device=device)
    torch.library.opcheck(
        torch.ops.sagellm.rms_norm.default, (torch.empty(4, 32, device=device), x, w, EPS)
    )
    torch.library.opcheck(
        torch.ops.sagellm.fused_add_rms_norm.default,
        (x.clone(), torch.randn(4, 32, device=device), w, EPS),
    )


def test_traces_under_torch_compile(device):
    def block(x, residual, w):
        norm.fused_add_rms_norm(x, residual, w, EPS)
        return norm.rms_norm(x, w, EPS) * 2

    x, w = _inputs(4, 32, torch.float32, device=device)
    r = torch.randn(4, 32, device=device)
    xe, re_ = x.clone(), r.clone()
    expected = block(xe, re_, w)
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x, r, w)
    torch.testing.assert_close(got, expected)
    assert torch.equal(r, re_) and torch.equal(x, xe)
