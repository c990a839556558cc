"""silu_and_mul and gelu_and_mul (erf and tanh) against the pure-torch reference, on every device
present; the reference runs on the same device as the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagellm import ops
from sagellm.ops import activation
from sagellm.ops.reference import activation as ref
from tests.ops.tolerances import DTYPES, poisoned, tol

HAVE_CUDA = torch.cuda.is_available() and ops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

D = [1, 7, 576, 4097]
ROWS = [0, 1, 3]
ACTS = ["silu", "gelu_none", "gelu_tanh"]
# CUDA: model intermediate sizes (16-byte path) and 5120 + 8, 4097 (element-wise path).
CUDA_D = [4096, 5128, 14336, 4097]
CUDA_ROWS = [1, 5, 1031]


def _run(act, x, out=None):
    if act == "silu":
        return activation.silu_and_mul(x, out=out)
    return activation.gelu_and_mul(x, act.removeprefix("gelu_"), out=out)


def _ref(act, x):
    if act == "silu":
        return ref.silu_and_mul(x)
    return ref.gelu_and_mul(x, act.removeprefix("gelu_"))


def _check(act, rows, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, 2 * d, generator=g)).to(dtype).to(device)
    out = poisoned(rows, d, dtype=dtype, device=device)
    _run(act, x, out=out)
    torch.testing.assert_close(out, _ref(act, x), **tol(dtype))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", D)
@pytest.mark.parametrize("rows", ROWS)
def test_gated_activation(device, act, dtype, d, rows):
    _check(act, rows, d, dtype, device, seed=d * 7 + rows)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 4097])
def test_every_isa(cpu_isa, act, dtype, d):
    _check(act, 3, d, dtype, "cpu", seed=d)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", CUDA_D)
@pytest.mark.parametrize("rows", CUDA_ROWS)
def test_cuda_model_sizes(act, dtype, d, rows):
    _check(act, rows, d, dtype, "cuda", seed=d + rows)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_cuda_large(act):
    _check(act, 8191, 14336, torch.bfloat16, "cuda", seed=5)


@pytest.mark.parametrize("act", ACTS)
def test_gated_activation_strided_rows(device, act):
    # Input rows inside a wider buffer, output rows inside another, 3-d leading dims.
    big = torch.randn(2, 3, 300).to(torch.bfloat16).to(device)
    x = big[..., 20:220]
    out_big = poisoned(2, 3, 150, dtype=torch.bfloat16, device=device)
    out = out_big[..., 25:125]
    _run(act, x, out=out)
    torch.testing.assert_close(out, _ref(act, x), **tol(torch.bfloat16))
    assert out_big[..., :25].isnan().all() and out_big[..., 125:].isnan().all()


@pytest.mark.parametrize("act", ACTS)
def test_gated_activation_aligned_strided_rows(device, act):
    # Strided rows that keep 16-byte alignment: the vector path on CUDA, on views.
    big = torch.randn(4, 5, 2 * 256 + 16).to(torch.float16).to(device)
    x = big[..., 8 : 8 + 2 * 256]
    out_big = poisoned(4, 5, 256 + 24, dtype=torch.float16, device=device)
    out = out_big[..., 16 : 16 + 256]
    _run(act, x, out=out)
    torch.testing.assert_close(out, _ref(act, x), **tol(torch.float16))
    assert out_big[..., :16].isnan().all() and out_big[..., 16 + 256 :].isnan().all()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_accuracy_fp32(device, approximate):
    # The erf (Hastings, A&S 7.1.26) and the sigmoid form of tanh-gelu, over a dense range:
    # |error| <= 2.5e-7 * max(1, |x|) against fp64.
    x = torch.linspace(-12, 12, 48001, dtype=torch.float32)
    inp = torch.cat([x, torch.ones_like(x)])[None].to(device)
    y = activation.gelu_and_mul(inp, approximate)[0].double().cpu()
    exact = F.gelu(x.double(), approximate=approximate)
    err = (y - exact).abs() / x.double().abs().clamp_min(1.0)
    assert err.max().item() <= 2.5e-7


def test_silu_accuracy_fp32(device):
    x = torch.linspace(-30, 30, 60001, dtype=torch.float32)
    inp = torch.cat([x, torch.ones_like(x)])[None].to(device)
    y = activation.silu_and_mul(inp)[0].double().cpu()
    exact = F.silu(x.double())
    err = (y - exact).abs() / exact.abs().clamp_min(1.0)
    assert err.max().item() <= 2e-6


def test_gelu_tanh_differs_from_erf(device):
    x = torch.linspace(-4, 4, 2002, dtype=torch.float32, device=device)[None]
    erf, tanh = activation.gelu_and_mul(x, "none"), activation.gelu_and_mul(x, "tanh")
    torch.testing.assert_close(tanh, ref.gelu_and_mul(x, "tanh"), **tol(torch.float32))
    assert (erf - tanh).abs().max() > 1e-4


def test_gated_activation_bad_inputs(device):
    x = torch.randn(3, 16, device=device)

    def empty(*shape, **kw):
        return torch.empty(*shape, device=device, **kw)

    with pytest.raises(RuntimeError, match="approximate"):
        activation.gelu_and_mul(x, "fast")
    with pytest.raises(RuntimeError, match="input"):
        torch.ops.sagellm.silu_and_mul(empty(3, 7), torch.randn(3, 15, device=device))
    with pytest.raises(RuntimeError, match="input"):
        activation.silu_and_mul(x.double())
    with pytest.raises(RuntimeError, match="out"):
        activation.silu_and_mul(x, out=empty(3, 16))
    with pytest.raises(RuntimeError, match="out"):
        activation.gelu_and_mul(x, out=empty(3, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="out"):
        activation.silu_and_mul(x, out=empty(8, 3).t())
    with pytest.raises(RuntimeError, match="input"):
        torch.ops.sagellm.silu_and_mul(empty(()), torch.tensor(1.0, device=device))


@needs_cuda
@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    x = torch.randn(3, 16, device="cuda")
    with pytest.raises(RuntimeError, match=r"out is on cpu but input is on cuda"):
        activation.silu_and_mul(x, out=torch.empty(3, 8))


def test_opcheck(device):
    x = torch.randn(4, 32, device=device)
    out = torch.empty(4, 16, device=device)
    torch.library.opcheck(torch.ops.sagellm.silu_and_mul.default, (out, x))
    for approximate in ("none", "tanh"):
        torch.library.opcheck(torch.ops.sagellm.gelu_and_mul.default, (out, x, approximate))


def test_traces_under_torch_compile(device):
    def mlp(x):
        return activation.silu_and_mul(x) + activation.gelu_and_mul(x, "tanh")

    x = torch.randn(4, 32, device=device)
    got = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, mlp(x))
