"""GGUF block formats on CUDA: gguf_linear's CUDA kernel, and gguf_dequantize on every device.

gguf_linear on CUDA does NOT round the activations to int8 (the CPU kernel does): it is
dequantize-then-matmul with fp32 accumulation, compared here with the float64 product of the
input and the gguf package's dequantized weight, elementwise, allowing
    allowed = c * (|x| @ |W|^T + |b|) + r * |y|
- M <= 8 (the GEMV kernel; the C++ kMaxGemvRows is at least 8): the weights are exact fp32, so
  c = TIGHT (1e-5, fp32 accumulation over K) and r = the output's rounding (at most 2^-8 of |y|
  for bf16, 2^-11 for fp16).
- larger M (the GEMV on two panels, or dequantize to the input dtype + cuBLAS): the weight may be
  rounded to bf16 / fp16 first (at most 2^-8 / 2^-11 relative each) and cuBLAS may reduce in
  reduced precision: c = 2^-7 (bf16), 2^-9 (fp16), 1e-5 (fp32).
gguf_dequantize must equal gguf.quants.dequantize bit for bit (fp32), then rounded to nearest-even
for fp16 / bf16, on the CPU and on CUDA: both run the same decoders (quant/gguf_decode_parts.h).
"""

from __future__ import annotations

import functools

import pytest
import torch

from sagellm import ops
from sagellm.ops import quant
from sagellm.ops.reference import quant as ref
from tests.ops.tolerances import poisoned

QTYPES = sorted(quant.GGUF_BLOCKS)  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
NAME = {t: name for t, (name, _, _) in quant.GGUF_BLOCKS.items()}
M_VALUES = [1, 2, 7, 8, 16, 33, 128]
# (N, K): N not a multiple of the 16 rows of a CTA; K = 2304 is 3 tiles of 1024 at 8 input rows,
# K = 8448 two tiles even at 1 row (8192 floats of staged input per CTA).
SHAPES = [(37, 256), (19, 2304), (11, 8448)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TIGHT = 1e-5
GEMV_TIGHT_MAX_M = 8
LOOSE = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9, torch.float32: 1e-5}
HALF_STEP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}


def _has_cuda_kernel(op: str) -> bool:
    return hasattr(torch.ops.sagellm, op) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"sagellm::{op}", "CUDA"
    )


CUDA_OK = torch.cuda.is_available() and ops.build_info()["cuda"] and _has_cuda_kernel("gguf_linear")
needs_cuda = pytest.mark.skipif(
    not CUDA_OK, reason="no GPU, or sagellm._C without CUDA gguf_linear"
)
DEQUANT_DEVICES = ["cpu"] + (["cuda"] if CUDA_OK and _has_cuda_kernel("gguf_dequantize") else [])


@functools.cache
def _weight(qtype: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random valid blocks (CPU) and their float64 dequantization by the gguf package."""
    g = torch.Generator().manual_seed(seed * 100003 + qtype * 1009 + n * 31 + k)
    w = ref.random_gguf_blocks(qtype, n, k, g)
    return w, ref.dequantize_gguf(w, qtype).to(torch.float64)


def _check(x, w, wf, qtype, bias=None, out=None):
    """Run gguf_linear on CUDA into a NaN-poisoned out and compare with the float64 product."""
    m, n = x.shape[0], w.shape[0]
    if out is None:
        out = poisoned(m, n, dtype=x.dtype, device="cuda")
    result = quant.gguf_linear(x, w, qtype, bias, out=out)
    assert result is out
    y = out.double().cpu()
    xd = x.double().cpu()
    b = bias.double().cpu() if bias is not None else torch.zeros(n, dtype=torch.float64)
    want = xd @ wf.T + b
    magnitude = xd.abs() @ wf.abs().T + b.abs()
    c = TIGHT if m <= GEMV_TIGHT_MAX_M else LOOSE[x.dtype]
    allowed = c * magnitude + HALF_STEP[x.dtype] * want.abs() + 1e-30
    err = (y - want).abs()
    worst = (err / allowed).max().item()
    assert worst <= 1.0, (
        f"{NAME[qtype]} {tuple(x.shape)}x{n} {x.dtype}: off by {err.max().item():.3g} "
        f"({worst:.2f} x allowed, c = {c:g})"
    )


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", SHAPES, ids=str)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: NAME[t])
def test_gguf_linear_cuda_random_blocks(qtype, m, n, k, dtype):
    w, wf = _weight(qtype, n, k)
    g = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    bias = torch.randn(n, generator=g).to(dtype).cuda() if m % 2 == 1 else None
    _check(x, w.cuda(), wf, qtype, bias)


@needs_cuda
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: NAME[t])
def test_gguf_linear_cuda_many_rows(qtype, m):
    # Many CTAs, and rows of Llama's K: each lane walks several rounds of parts.
    n, k = 1000, 4096
    w, wf = _weight(qtype, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().cuda()
    _check(x, w.cuda(), wf, qtype)


@needs_cuda
@pytest.mark.parametrize("qtype", [2, 3, 6, 7, 8], ids=lambda t: NAME[t])
def test_gguf_linear_cuda_quantized_by_gguf(qtype):
    # Blocks the gguf package's own quantizer wrote (the types it can write), not random bytes.
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    n, k = 64, 1024
    dense = torch.randn(n, k, generator=torch.Generator().manual_seed(qtype)) * 0.05
    w = torch.from_numpy(quantize(dense.numpy(), GGMLQuantizationType(qtype)))
    wf = ref.dequantize_gguf(w, qtype).to(torch.float64)
    for m in (1, 5, 40):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().cuda()
        _check(x, w.cuda(), wf, qtype)


@needs_cuda
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: NAME[t])
@pytest.mark.parametrize("m", [1, 4, 33])
def test_gguf_linear_cuda_weight_alignment(qtype, m):
    # A weight view starting 2 bytes into a buffer: the 16-bit-load path for every type (the
    # 4-byte-block types otherwise take 32-bit loads); the same numbers either way.
    n, k = 21, 512
    w, wf = _weight(qtype, n, k)
    buf = torch.zeros(w.numel() + 2, dtype=torch.uint8, device="cuda")
    shifted = buf[2:].view(w.shape)
    shifted.copy_(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).bfloat16().cuda()
    aligned = quant.gguf_linear(x, w.cuda(), qtype)
    assert torch.equal(quant.gguf_linear(x, shifted, qtype), aligned)
    _check(x, shifted, wf, qtype)
    odd = torch.zeros(w.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view(w.shape)
    with pytest.raises(RuntimeError, match="odd address"):
        quant.gguf_linear(x, odd, qtype)


@needs_cuda
@pytest.mark.parametrize("qtype", [3, 8, 12], ids=lambda t: NAME[t])
@pytest.mark.parametrize("m", [6, 40])
def test_gguf_linear_cuda_strided_rows(qtype, m):
    k, n = 512, 13
    w, wf = _weight(qtype, n, k)
    wc = w.cuda()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(m, k + 40, generator=g).bfloat16().cuda()[:, 17 : 17 + k]
    out_buf = poisoned(m, n + 5, dtype=torch.bfloat16, device="cuda")
    _check(x, wc, wf, qtype, None, out=out_buf[:, 2 : 2 + n])
    assert out_buf[:, :2].isnan().all() and out_buf[:, 2 + n :].isnan().all()
    x2 = torch.randn(m, 2 * k, generator=g).bfloat16().cuda()[:, ::2]  # copied by the entry
    _check(x2, wc, wf, qtype, None)


@needs_cuda
def test_gguf_linear_cuda_empty_dims():
    w, _ = _weight(2, 7, 256)
    wc, b = w.cuda(), torch.randn(7, device="cuda").bfloat16()
    x0 = torch.randn(0, 256, device="cuda").bfloat16()
    assert quant.gguf_linear(x0, wc, 2, b).shape == (0, 7)
    empty_w = torch.empty(7, 0, dtype=torch.uint8, device="cuda")
    xk0 = torch.randn(3, 0, device="cuda").bfloat16()
    torch.testing.assert_close(quant.gguf_linear(xk0, empty_w, 2, b), b.expand(3, 7))
    torch.testing.assert_close(quant.gguf_linear(xk0, empty_w, 2), torch.zeros_like(b.expand(3, 7)))


@needs_cuda
def test_gguf_linear_cuda_rejects_bad_inputs():
    w, _ = _weight(3, 8, 64)  # Q4_1: 2 blocks of 20 bytes per row
    wc = w.cuda()
    x = torch.randn(4, 64, device="cuda").bfloat16()
    out, b = torch.empty(4, 8, device="cuda").bfloat16(), torch.randn(8, device="cuda").bfloat16()

    def bad(out, x, w, qtype, b, match):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.sagellm.gguf_linear(out, x, w, qtype, b)

    bad(out, x, wc, 99, b, "qtype = 99 is not a supported GGML type")
    bad(out, x, wc, 10, b, "qtype = 10 is not")
    bad(out, x.int(), wc, 3, b, "input has dtype Int")
    bad(out, x, w, 3, b, "weight is on cpu")
    bad(out.cpu(), x, wc, 3, b, "out is on cpu")
    bad(out, x, wc, 3, b.cpu(), "bias is on cpu")
    bad(out, x, wc.to(torch.int8), 3, b, "weight has dtype Char; expected uint8")
    bad(out, x, wc[:, :39].contiguous(), 3, b, r"weight has shape \[8, 39\]; expected \[N, 40\]")
    bad(out, x, wc, 12, b, "K = 64 columns, which is not a multiple of the Q4_K block size 256")
    bad(out, x, wc, 8, b, r"weight has shape \[8, 40\]; expected \[N, 68\]")
    bad(out.half(), x, wc, 3, b, "out has dtype Half but input has dtype BFloat16")
    bad(out.half(), x.half(), wc, 3, b, "bias has dtype BFloat16 but input has dtype Half")
    bad(out, x.half(), wc, 3, b.half(), "out has dtype BFloat16 but input has dtype Half")
    bad(out.half()[:, :7], x.half(), wc, 3, b.half(), r"out has shape \[4, 7\]")
    bad(torch.empty(8, 4, device="cuda").bfloat16().t(), x, wc, 3, b, "must be contiguous in its")
    bad(out, x, wc, 3, torch.randn(9, device="cuda").bfloat16(), r"bias has shape \[9\]")
    shared = torch.randn(4 * 64, device="cuda").bfloat16()
    bad(shared[:32].view(4, 8), shared.view(4, 64), wc, 3, None, "out overlaps input")


@needs_cuda
@pytest.mark.parametrize("m", [1, 8, 12, 33])
def test_gguf_linear_cuda_graph_capture(m):
    # Captured and replayed on new input values: equal to eager (the mm path allocates its
    # scratch inside the capture, from the graph's private pool).
    qtype, n, k = 12, 96, 1024
    w, _ = _weight(qtype, n, k)
    wc = w.cuda()
    bias = torch.randn(n, device="cuda").bfloat16()
    x = torch.randn(m, k, device="cuda").bfloat16()
    out = torch.empty(m, n, device="cuda").bfloat16()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as torch.cuda.graphs asks
        torch.ops.sagellm.gguf_linear(out, x, wc, qtype, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.sagellm.gguf_linear(out, x, wc, qtype, bias)
    for seed in range(3):
        x.copy_(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).bfloat16())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = quant.gguf_linear(x, wc, qtype, bias)
        # The GEMV is deterministic; cuBLAS (M > 16) may pick another split inside the graph.
        tol = 0.0 if m <= GEMV_TIGHT_MAX_M else 2.0**-8
        torch.testing.assert_close(out, eager, rtol=tol, atol=tol)


def _default_model_tensors() -> list[tuple[str, int]]:
    return [("blk.0.ffn_down.weight", 3), ("blk.3.attn_k.weight", 3), ("token_embd.weight", 8)]


@functools.cache
def _real(name: str, max_rows: int = 3000) -> tuple[torch.Tensor, int]:
    from sagellm.models.default_model import default_model_path
    from sagellm.models.gguf_loader import GGUFFile

    f = GGUFFile(default_model_path())
    info = next(t for t in f.tensors if t.name == name)
    n, _ = info.shape
    raw = f.data[info.offset : info.offset + info.nbytes].reshape(n, -1)[:max_rows]
    return torch.from_numpy(raw.copy()), int(info.ggml_type)


@needs_cuda
@pytest.mark.parametrize("name,qtype", _default_model_tensors(), ids=str)
@pytest.mark.parametrize("m", [1, 7, 40])
def test_gguf_linear_cuda_matches_cpu_on_default_model(name, qtype, m):
    # The same file's tensor on both devices: CUDA and the CPU op (which rounds the input to
    # int8 blocks) agree within the CPU's activation-rounding bound plus both fp32 tolerances.
    try:
        w, stored = _real(name)
    except Exception as e:  # noqa: BLE001 - the model package is optional
        pytest.skip(f"default model not available: {e}")
    assert stored == qtype, f"{name} is stored as type {stored}, the test expects {qtype}"
    wf = ref.dequantize_gguf(w, qtype).to(torch.float64)
    k = wf.shape[1]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    y_cpu = quant.gguf_linear(x, w, qtype).double()
    y_cuda = quant.gguf_linear(x.cuda(), w.cuda(), qtype).double().cpu()
    _check(x.cuda(), w.cuda(), wf, qtype)
    xd = x.double()
    magnitude = xd.abs() @ wf.abs().T
    want = xd @ wf.T
    c = TIGHT if m <= GEMV_TIGHT_MAX_M else LOOSE[torch.bfloat16]
    act = ref.quantize_activations_error_bound(x, wf)
    bound = (
        act * 1.001
        + (c + 1e-5) * magnitude
        + 2 * HALF_STEP[torch.bfloat16] * (want.abs() + act)
        + 1e-30
    )
    assert ((y_cuda - y_cpu).abs() <= bound).all(), f"{name}: CUDA and CPU differ beyond the bound"


# ---- gguf_dequantize (every device) -----------------------------------------------------------


@pytest.mark.parametrize("device", DEQUANT_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: NAME[t])
def test_gguf_dequantize_equals_gguf_package(device, qtype, dtype):
    n, k = 23, 2304
    w, wf = _weight(qtype, n, k)
    out = poisoned(n, k, dtype=dtype, device=device)
    torch.ops.sagellm.gguf_dequantize(out, w.to(device), qtype)
    assert torch.equal(out.cpu(), wf.float().to(dtype)), f"{NAME[qtype]} {dtype} on {device}"


@pytest.mark.parametrize("device", DEQUANT_DEVICES)
@pytest.mark.parametrize("qtype", [3, 8, 12, 14], ids=lambda t: NAME[t])
def test_gguf_dequantize_selected_rows_into_strided_out(device, qtype):
    # An embedding lookup: a few rows picked from the table, written into a wider buffer.
    n, k = 50, 512
    w, wf = _weight(qtype, n, k)
    ids = torch.tensor([7, 0, 49, 7, 13])
    picked = w.to(device).index_select(0, ids.to(device))
    buf = poisoned(5, k + 8, dtype=torch.float32, device=device)
    torch.ops.sagellm.gguf_dequantize(buf[:, 4 : 4 + k], picked, qtype)
    assert torch.equal(buf[:, 4 : 4 + k].cpu(), wf[ids].float())
    assert buf[:, :4].isnan().all() and buf[:, 4 + k :].isnan().all()
    shifted = torch.zeros(picked.numel() + 2, dtype=torch.uint8, device=device)[2:]
    shifted = shifted.view(picked.shape)
    shifted.copy_(picked)
    out = torch.empty(5, k, device=device)
    torch.ops.sagellm.gguf_dequantize(out, shifted, qtype)
    assert torch.equal(out.cpu(), wf[ids].float())


@pytest.mark.parametrize("device", DEQUANT_DEVICES)
def test_gguf_dequantize_rejects_bad_inputs(device):
    w, _ = _weight(3, 8, 64)
    w = w.to(device)
    out = torch.empty(8, 64, device=device)

    def bad(out, w, qtype, match):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.sagellm.gguf_dequantize(out, w, qtype)

    bad(out, w, 1, "gguf_dequantize: qtype = 1 is not a supported GGML type")
    bad(out, w.to(torch.int8), 3, "weight has dtype Char; expected uint8")
    bad(out, w.view(8, 40, 1), 3, "weight must be 2-d")
    bad(out, torch.zeros(8, 80, dtype=torch.uint8, device=device)[:, ::2], 3, "must be contiguous")
    bad(out.int(), w, 3, "out has dtype Int; expected float32, float16 or bfloat16")
    bad(out.view(8, 64, 1), w, 3, "out must be 2-d")
    bad(out[:7], w, 3, r"out has shape \[7, 64\]; expected \[8, K\]")
    bad(out, w, 12, "K = 64 columns, which is not a multiple of the Q4_K block size 256")
    bad(out[:, :32], w, 3, r"weight has shape \[8, 40\]; expected \[R, 20\]")
    bad(torch.empty(64, 8, device=device).t(), w, 3, "must be contiguous in its last dim")
    other = "cpu" if device == "cuda" else None
    if other:
        bad(out.to(other), w, 3, "out is on cpu")


def test_gguf_dequantize_empty():
    w = torch.empty(0, 40, dtype=torch.uint8)
    torch.ops.sagellm.gguf_dequantize(torch.empty(0, 64), w, 3)
    torch.ops.sagellm.gguf_dequantize(torch.empty(5, 0), torch.empty(5, 0, dtype=torch.uint8), 3)
