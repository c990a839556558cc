"""silu_and_mul and gelu_and_mul (erf and tanh) against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagellm.ops import activation
from sagellm.ops.reference import activation as ref
from tests.ops.tolerances import DTYPES, poisoned, tol

D = [1, 7, 576, 4097]
ROWS = [0, 1, 3]
ACTS = ["silu", "gelu_none", "gelu_tanh"]


def _run(act, x, out=None):
    if act == "silu":
        return activation.silu_and_mul(x, out=out)
    return activation.gelu_and_mul(x, act.removeprefix("gelu_"), out=out)


def _ref(act, x):
    if act == "silu":
        return ref.silu_and_mul(x)
    return ref.gelu_and_mul(x, act.removeprefix("gelu_"))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", D)
@pytest.mark.parametrize("rows", ROWS)
def test_gated_activation(cpu_isa, act, dtype, d, rows):
    g = torch.Generator().manual_seed(d * 7 + rows)
    x = (3 * torch.randn(rows, 2 * d, generator=g)).to(dtype)
    out = poisoned(rows, d, dtype=dtype)
    _run(act, x, out=out)
    torch.testing.assert_close(out, _ref(act, x), **tol(dtype))


@pytest.mark.parametrize("act", ACTS)
def test_gated_activation_strided_rows(cpu_isa, act):
    # Input rows inside a wider buffer, output rows inside another, 3-d leading dims.
    big = torch.randn(2, 3, 300).to(torch.bfloat16)
    x = big[..., 20:220]
    out_big = poisoned(2, 3, 150, dtype=torch.bfloat16)
    out = out_big[..., 25:125]
    _run(act, x, out=out)
    torch.testing.assert_close(out, _ref(act, x), **tol(torch.bfloat16))
    assert out_big[..., :25].isnan().all() and out_big[..., 125:].isnan().all()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_accuracy_fp32(cpu_isa, approximate):
    # The vectorised erf (Hastings, A&S 7.1.26) and the sigmoid form of tanh-gelu, over a dense
    # range: |error| <= 2.5e-7 * max(1, |x|) against fp64.
    x = torch.linspace(-12, 12, 48001, dtype=torch.float32)
    inp = torch.cat([x, torch.ones_like(x)])[None]
    y = activation.gelu_and_mul(inp, approximate)[0].double()
    exact = F.gelu(x.double(), approximate=approximate)
    err = (y - exact).abs() / x.double().abs().clamp_min(1.0)
    assert err.max().item() <= 2.5e-7


def test_gelu_tanh_differs_from_erf():
    x = torch.linspace(-4, 4, 2002, dtype=torch.float32)[None]
    erf, tanh = activation.gelu_and_mul(x, "none"), activation.gelu_and_mul(x, "tanh")
    torch.testing.assert_close(tanh, ref.gelu_and_mul(x, "tanh"), **tol(torch.float32))
    assert (erf - tanh).abs().max() > 1e-4


def test_gated_activation_bad_inputs():
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="approximate"):
        activation.gelu_and_mul(x, "fast")
    with pytest.raises(RuntimeError, match="input"):
        torch.ops.sagellm.silu_and_mul(torch.empty(3, 7), torch.randn(3, 15))
    with pytest.raises(RuntimeError, match="input"):
        activation.silu_and_mul(x.double())
    with pytest.raises(RuntimeError, match="out"):
        activation.silu_and_mul(x, out=torch.empty(3, 16))
    with pytest.raises(RuntimeError, match="out"):
        activation.gelu_and_mul(x, out=torch.empty(3, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="out"):
        activation.silu_and_mul(x, out=torch.empty(8, 3).t())
    with pytest.raises(RuntimeError, match="input"):
        torch.ops.sagellm.silu_and_mul(torch.empty(()), torch.tensor(1.0))


def test_opcheck():
    x = torch.randn(4, 32)
    torch.library.opcheck(torch.ops.sagellm.silu_and_mul.default, (torch.empty(4, 16), x))
    for approximate in ("none", "tanh"):
        torch.library.opcheck(
            torch.ops.sagellm.gelu_and_mul.default, (torch.empty(4, 16), x, approximate)
        )


def test_traces_under_torch_compile():
    def mlp(x):
        return activation.silu_and_mul(x) + activation.gelu_and_mul(x, "tanh")

    x = torch.randn(4, 32)
    got = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, mlp(x))
