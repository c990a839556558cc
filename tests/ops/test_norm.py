"""rms_norm and fused_add_rms_norm against the pure-torch reference (HF LlamaRMSNorm rounding)."""

from __future__ import annotations

import pytest
import torch

from sagellm.ops import norm
from sagellm.ops.reference import norm as ref
from tests.ops.tolerances import DTYPES, poisoned, tol

HIDDEN = [1, 7, 576, 4097]
ROWS = [0, 1, 5]
EPS = 1e-6


def _inputs(rows, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1.0 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(cpu_isa, dtype, hidden, rows):
    x, w = _inputs(rows, hidden, dtype, seed=hidden + rows)
    out = poisoned(rows, hidden, dtype=dtype)
    norm.rms_norm(x, w, EPS, out=out)
    torch.testing.assert_close(out, ref.rms_norm(x, w, EPS), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_view_of_qkv(cpu_isa, dtype):
    # q/k norm (Qwen3): rows are heads of a fused qkv buffer, two strided levels.
    tokens, heads, kv_heads, d = 5, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype)
    q = qkv[:, : heads * d].view(tokens, heads, d)
    w = torch.rand(d).to(dtype) + 0.5
    expected = ref.rms_norm(q, w, EPS)
    before = qkv.clone()
    norm.rms_norm(q, w, EPS, out=q)  # in place, through the strided view
    torch.testing.assert_close(q, expected, **tol(dtype))
    assert torch.equal(qkv[:, heads * d :], before[:, heads * d :])


def test_rms_norm_input_with_three_strided_levels(cpu_isa):
    # Leading dims that do not collapse into two levels: the input is copied first.
    base = torch.randn(3, 4, 5, 64)
    x = base[:, ::2, ::2]
    w = torch.rand(64) + 0.5
    out = norm.rms_norm(x, w, EPS)
    torch.testing.assert_close(out, ref.rms_norm(x, w, EPS), **tol(torch.float32))


def test_rms_norm_matches_transformers_bf16(cpu_isa):
    transformers = pytest.importorskip("transformers")
    layer = transformers.models.llama.modeling_llama.LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(576) + 0.5)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(9, 576).to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    out = norm.rms_norm(x, layer.weight.detach(), 1e-5)
    # Same rounding points: at most one bf16 step apart (rsqrt vs 1/sqrt rounding).
    torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)
    assert (out != expected).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_fused_add_rms_norm(cpu_isa, dtype, hidden, rows):
    x, w = _inputs(rows, hidden, dtype, seed=hidden * 3 + rows)
    residual = torch.randn(rows, hidden).to(dtype)
    expected, expected_residual = ref.fused_add_rms_norm(x, residual, w, EPS)
    norm.fused_add_rms_norm(x, residual, w, EPS)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(x, expected, **tol(dtype))


def test_fused_add_rms_norm_strided_rows(cpu_isa):
    big_x = torch.randn(6, 200).to(torch.bfloat16)
    big_r = torch.randn(6, 300).to(torch.bfloat16)
    x, r = big_x[:, 10:138], big_r[:, :128]
    w = torch.rand(128).to(torch.bfloat16) + 0.5
    expected, expected_residual = ref.fused_add_rms_norm(x, r, w, EPS)
    untouched = big_x[:, 138:].clone()
    norm.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(r, expected_residual)
    torch.testing.assert_close(x, expected, **tol(torch.bfloat16))
    assert torch.equal(big_x[:, 138:], untouched)


def test_rms_norm_bad_inputs():
    x, w = _inputs(3, 16, torch.float32)
    out = torch.empty(3, 16)
    with pytest.raises(RuntimeError, match="input"):
        torch.ops.sagellm.rms_norm(out.int(), x.int(), w.int(), EPS)
    with pytest.raises(RuntimeError, match="weight"):
        norm.rms_norm(x, w.half(), EPS)
    with pytest.raises(RuntimeError, match="weight"):
        norm.rms_norm(x, torch.ones(15), EPS)
    with pytest.raises(RuntimeError, match="out"):
        norm.rms_norm(x, w, EPS, out=torch.empty(3, 15))
    with pytest.raises(RuntimeError, match="out"):
        norm.rms_norm(x, w, EPS, out=torch.empty(3, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out"):
        norm.rms_norm(x, w, EPS, out=torch.empty(16, 3).t())
    with pytest.raises(RuntimeError, match="epsilon"):
        norm.rms_norm(x, w, -1.0)
    with pytest.raises(RuntimeError, match="input"):
        norm.rms_norm(torch.tensor(1.0), torch.ones(1), EPS)


def test_fused_add_rms_norm_bad_inputs():
    x, w = _inputs(3, 16, torch.float32)
    with pytest.raises(RuntimeError, match="residual"):
        norm.fused_add_rms_norm(x, torch.zeros(3, 17), w, EPS)
    with pytest.raises(RuntimeError, match="residual"):
        norm.fused_add_rms_norm(x, torch.zeros(3, 16, dtype=torch.float16), w, EPS)
    with pytest.raises(RuntimeError, match="residual"):
        norm.fused_add_rms_norm(x, torch.zeros(16, 3).t(), w, EPS)
    with pytest.raises(RuntimeError, match="weight"):
        norm.fused_add_rms_norm(x, torch.zeros(3, 16), torch.ones(8), EPS)
    with pytest.raises(RuntimeError, match="input"):
        norm.fused_add_rms_norm(x.double(), torch.zeros(3, 16).double(), w.double(), EPS)


def test_opcheck():
    x, w = _inputs(4, 32, torch.float32)
    torch.library.opcheck(torch.ops.sagellm.rms_norm.default, (torch.empty(4, 32), x, w, EPS))
    torch.library.opcheck(
        torch.ops.sagellm.fused_add_rms_norm.default, (x.clone(), torch.randn(4, 32), w, EPS)
    )


def test_traces_under_torch_compile():
    def block(x, residual, w):
        norm.fused_add_rms_norm(x, residual, w, EPS)
        return norm.rms_norm(x, w, EPS) * 2

    x, w = _inputs(4, 32, torch.float32)
    r = torch.randn(4, 32)
    xe, re_ = x.clone(), r.clone()
    expected = block(xe, re_, w)
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x, r, w)
    torch.testing.assert_close(got, expected)
    assert torch.equal(r, re_) and torch.equal(x, xe)
