"""Quantized KV caches (int8 / float8_e4m3fn with per-(token, head) fp32 scales) on CUDA against
the CPU ops on the same inputs: reshape_and_cache bit for bit, decode and prefill attention within
the tolerances below, block copies byte for byte, and every op under CUDA-graph capture.

Attention tolerances (CUDA vs the CPU op, both over the same quantized cache): the CUDA decode
kernel for fp16 / bf16 queries runs the dot products on fp16 tensor cores (exact inputs: the
stored values are fp16 values and each query row is scaled by a power of two) and rounds the
softmax weights times the V scales to fp16 (2^-11 relative), so the difference is that rounding
plus the rounding of the output to the query dtype. fp32 queries run in fp32 on both devices.
"""

from __future__ import annotations

import pytest
import torch

import sagellm.ops as sagellm_ops

HAVE_CUDA = torch.cuda.is_available() and sagellm_ops.build_info()["cuda"]
pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

KV_DTYPES = [torch.int8, torch.float8_e4m3fn]
ATTN_TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
sagellm = torch.ops.sagellm


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so equality means bit-for-bit (NaN and -0.0 included)."""
    return t.contiguous().view(torch.uint8).cpu()


def rows(num_tokens, heads, head_size, dtype, spread=2.0):
    """Random K or V rows whose magnitude varies per (token, head) by up to 10**spread."""
    x = torch.randn(num_tokens, heads, head_size)
    x *= 10.0 ** (spread * (torch.rand(num_tokens, heads, 1) - 0.5))
    return x.to(dtype)


def empty_quant_cache(num_blocks, block_size, heads, head_size, kv_dtype):
    """Caches and scales full of garbage, so unwritten slots are compared too."""
    shape = (num_blocks, block_size, heads, head_size)
    raw = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    if kv_dtype == torch.float8_e4m3fn:
        raw[(raw & 0x7F) == 0x7F] = 0  # no NaN encodings in the garbage either
    caches = raw.view(kv_dtype)
    scales = torch.rand(2, num_blocks, block_size, heads)
    return caches[0].clone(), caches[1].clone(), scales[0].clone(), scales[1].clone()


# ---- reshape_and_cache ----------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_size", [64, 80, 128, 256, 72])
def test_reshape_and_cache_matches_cpu_bitwise(kv_dtype, dtype, head_size):
    torch.manual_seed(head_size)
    heads, block_size, num_blocks, num_tokens = 3, 16, 6, 40
    # Strided token rows: K and V are slices of one fused [tokens, (q, k, v) heads] buffer.
    fused = torch.cat(
        [rows(num_tokens, heads, head_size, dtype) for _ in range(3)], dim=1
    )  # [tokens, 3 * heads, head_size]
    key, value = fused[:, heads : 2 * heads], fused[:, 2 * heads :]
    # Special rows: all zeros, tiny (fp32 denormals where the dtype has them), one huge element.
    key[0].zero_()
    value[1, 0] = 1e-39 if dtype == torch.float32 else 1e-7
    key[2, 1, 5] = 3e4
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[3] = slots[17] = -1
    kc, vc, ks, vs = empty_quant_cache(num_blocks, block_size, heads, head_size, kv_dtype)

    cpu = [t.clone() for t in (kc, vc, ks, vs)]
    sagellm.reshape_and_cache(key, value, cpu[0], cpu[1], slots, cpu[2], cpu[3])
    dev = [t.cuda() for t in (kc, vc, ks, vs)]
    sagellm.reshape_and_cache(
        key.cuda(), value.cuda(), dev[0], dev[1], slots.cuda(), dev[2], dev[3]
    )
    torch.cuda.synchronize()
    for name, want, got in zip(("key_cache", "value_cache", "k_scales", "v_scales"), cpu, dev):
        assert torch.equal(bits(got), bits(want)), f"{name} differs from the CPU op"


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_reshape_and_cache_rejects_bad_scales_on_cuda(kv_dtype):
    kc, vc, ks, vs = (t.cuda() for t in empty_quant_cache(2, 16, 2, 64, kv_dtype))
    key = torch.randn(3, 2, 64, device="cuda")
    slots = torch.tensor([0, 1, 2], device="cuda")
    with pytest.raises(RuntimeError, match="k_scales"):
        sagellm.reshape_and_cache(key, key, kc, vc, slots, None, vs)
    with pytest.raises(RuntimeError, match="v_scales"):
        sagellm.reshape_and_cache(key, key, kc, vc, slots, ks, vs[:1])
    with pytest.raises(RuntimeError, match="k_scales"):
        sagellm.reshape_and_cache(key, key, kc, vc, slots, ks.double(), vs)


# ---- attention ------------------------------------------------------------------------------


def quant_kv(seq_lens, num_kv_heads, head_size, block_size, kv_dtype, spare_blocks=2):
    """A quantized cache written by the CPU op, and a shuffled block table (garbage beyond)."""
    used = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(used) + spare_blocks
    kc, vc, ks, vs = empty_quant_cache(num_blocks, block_size, num_kv_heads, head_size, kv_dtype)
    n = num_blocks * block_size
    key = rows(n, num_kv_heads, head_size, torch.float32, spread=1.0)
    value = rows(n, num_kv_heads, head_size, torch.float32, spread=1.0)
    sagellm.reshape_and_cache(key, value, kc, vc, torch.arange(n), ks, vs)
    ids = torch.randperm(num_blocks, dtype=torch.int32)
    table = torch.randint(-(2**30), 2**30, (len(seq_lens), max(used) + 1), dtype=torch.int32)
    start = 0
    for i, u in enumerate(used):
        table[i, :u] = ids[start : start + u]
        start += u
    return kc, vc, ks, vs, table, torch.tensor(seq_lens, dtype=torch.int32)


def run_decode(device, query, kv, scale, window, cap):
    kc, vc, ks, vs, table, lens = (t.to(device) for t in kv)
    out = torch.full_like(query, float("nan"), device=device)
    sagellm.paged_attention_decode(
        out, query.to(device), kc, vc, table, lens, scale, window, cap, ks, vs
    )
    return out.cpu()


def run_prefill(device, query, kv, starts, scale, window, cap):
    kc, vc, ks, vs, table, lens = (t.to(device) for t in kv)
    out = torch.full_like(query, float("nan"), device=device)
    sagellm.paged_attention_prefill(
        out, query.to(device), kc, vc, table, lens, starts.to(device), scale, window, cap, ks, vs
    )
    return out.cpu()


def check_decode(seq_lens, heads, head_size, block_size, kv_dtype, dtype, window=-1, cap=0.0):
    num_heads, num_kv_heads = heads
    kv = quant_kv(seq_lens, num_kv_heads, head_size, block_size, kv_dtype)
    query = torch.randn(len(seq_lens), num_heads, head_size).to(dtype)
    scale = head_size**-0.5
    want = run_decode("cpu", query, kv, scale, window, cap)
    got = run_decode("cuda", query, kv, scale, window, cap)
    torch.testing.assert_close(got, want, **ATTN_TOL[dtype])


# Every head size and both block sizes and query dtypes, without their full cross product.
DECODE_CASES = [
    (64, 16, torch.bfloat16),
    (80, 32, torch.float16),
    (96, 16, torch.float16),
    (96, 32, torch.bfloat16),
    (128, 32, torch.bfloat16),
    (256, 16, torch.float16),
]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize(("head_size", "block_size", "dtype"), DECODE_CASES)
def test_decode_matches_cpu(head_size, block_size, dtype, kv_dtype):
    torch.manual_seed(head_size + block_size)
    check_decode([1, 17, 300, 613], (8, 2), head_size, block_size, kv_dtype, dtype)


@pytest.mark.parametrize(
    ("heads", "kv_dtype"),
    [
        ((4, 4), torch.int8),
        ((14, 2), torch.float8_e4m3fn),
        ((4, 1), torch.int8),
        ((32, 8), torch.float8_e4m3fn),
        ((20, 2), torch.int8),
    ],
)
def test_decode_gqa(heads, kv_dtype):
    torch.manual_seed(heads[0])
    check_decode([5, 64, 129], heads, 128, 16, kv_dtype, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_decode_window_soft_cap_odd_blocks(dtype, kv_dtype):
    torch.manual_seed(7)
    lens = [3, 40, 700]  # beyond both windows
    check_decode(lens, (8, 2), 128, 16, kv_dtype, dtype, window=100)
    check_decode(lens, (8, 2), 64, 5, kv_dtype, dtype, cap=30.0)
    check_decode(lens, (8, 2), 256, 5, kv_dtype, dtype, window=33, cap=5.0)


@pytest.mark.parametrize(
    ("kv_dtype", "dtype"), [(torch.int8, torch.bfloat16), (torch.float8_e4m3fn, torch.float16)]
)
def test_decode_split_kv_long_context(kv_dtype, dtype):
    # Few sequences and long contexts: the planner splits the keys into partitions.
    torch.manual_seed(11)
    check_decode([8192, 5000, 1], (32, 8), 128, 16, kv_dtype, dtype)


# Every head size, both block sizes, every query dtype (fp32, the strictest, at most sizes).
PREFILL_CASES = [
    (16, 64, torch.float32),
    (32, 80, torch.bfloat16),
    (16, 96, torch.float32),
    (32, 96, torch.float16),
    (32, 128, torch.float32),
    (16, 128, torch.bfloat16),
    (16, 256, torch.float16),
    (32, 256, torch.float32),
]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize(("block_size", "head_size", "dtype"), PREFILL_CASES)
def test_prefill_matches_cpu(block_size, head_size, dtype, kv_dtype):
    torch.manual_seed(head_size * block_size)
    # (cached prefix + new tokens) per sequence: fresh prompt, chunk after a prefix, one token.
    q_lens, seq_lens = [37, 20, 1, 64], [37, 150, 9, 64]
    kv = quant_kv(seq_lens, 2, head_size, block_size, kv_dtype)
    query = torch.randn(sum(q_lens), 8, head_size).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = head_size**-0.5
    for window, cap in ((-1, 0.0), (24, 0.0), (-1, 20.0)):
        want = run_prefill("cpu", query, kv, starts, scale, window, cap)
        got = run_prefill("cuda", query, kv, starts, scale, window, cap)
        torch.testing.assert_close(got, want, **ATTN_TOL[dtype])


def test_attention_rejects_missing_scales_on_cuda():
    kv = quant_kv([20], 2, 64, 16, torch.int8)
    kc, vc, ks, vs, table, lens = (t.cuda() for t in kv)
    query = torch.randn(1, 4, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(query)
    with pytest.raises(RuntimeError, match="v_scales"):
        sagellm.paged_attention_decode(out, query, kc, vc, table, lens, 0.1, -1, 0.0, ks, None)
    with pytest.raises(RuntimeError, match="k_scales"):
        sagellm.paged_attention_decode(out, query, kc, vc, table, lens, 0.1, -1, 0.0, ks[:, :8], vs)


# ---- block copies ---------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_block_copies_move_quantized_caches_and_scales(kv_dtype):
    torch.manual_seed(3)
    kc, vc, ks, vs = empty_quant_cache(8, 16, 2, 64, kv_dtype)
    mapping = torch.tensor([[0, 5], [5, 6], [2, 1]])
    want = [t.clone() for t in (kc, vc, ks, vs)]
    sagellm.copy_blocks([want[0]], [want[1]], mapping)
    sagellm.copy_blocks([want[2]], [want[3]], mapping)
    dev = [t.cuda() for t in (kc, vc, ks, vs)]
    sagellm.copy_blocks([dev[0]], [dev[1]], mapping.cuda())
    sagellm.copy_blocks([dev[2]], [dev[3]], mapping.cuda())
    for w, g in zip(want, dev):
        assert torch.equal(bits(g), bits(w))
    # GPU -> CPU swap of the cache and its scales.
    host = [torch.zeros(kc.shape, dtype=torch.uint8).view(kv_dtype), torch.zeros_like(ks)]
    swap = torch.tensor([[5, 0], [6, 3]])
    sagellm.swap_blocks(dev[0], host[0], swap)
    sagellm.swap_blocks(dev[2], host[1], swap)
    torch.cuda.synchronize()
    assert torch.equal(bits(host[0])[[0, 3]], bits(want[0])[[5, 6]])
    assert torch.equal(bits(host[1])[[0, 3]], bits(want[2])[[5, 6]])


# ---- CUDA graphs ----------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_cuda_graph_replay_equals_eager(kv_dtype):
    torch.manual_seed(5)
    heads, kv_heads, d, bs = 32, 8, 128, 16
    seq_lens = [4000, 300, 17, 1]  # the first one makes decode split its keys
    kv = [t.cuda() for t in quant_kv(seq_lens, kv_heads, d, bs, kv_dtype)]
    kc, vc, ks, vs, table, lens = kv
    n = len(seq_lens)
    new_k = torch.randn(n, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    new_v = torch.randn(n, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    # Each sequence's last token is rewritten, then attended to (decode and a 1-token prefill).
    slot = [int(table[i, (s - 1) // bs]) * bs + (s - 1) % bs for i, s in enumerate(seq_lens)]
    slots = torch.tensor(slot, device="cuda")
    query = torch.randn(n, heads, d, device="cuda", dtype=torch.bfloat16)
    starts = torch.arange(n + 1, device="cuda", dtype=torch.int32)
    out_d = torch.empty_like(query)
    out_p = torch.empty_like(query)

    def step():
        sagellm.reshape_and_cache(new_k, new_v, kc, vc, slots, ks, vs)
        sagellm.paged_attention_decode(out_d, query, kc, vc, table, lens, 0.08, -1, 0.0, ks, vs)
        sagellm.paged_attention_prefill(
            out_p, query, kc, vc, table, lens, starts, 0.08, -1, 0.0, ks, vs
        )

    step()
    torch.cuda.synchronize()
    eager = [t.clone() for t in (out_d, out_p, kc, ks)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the side stream (first-call attribute setup)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out_d.fill_(float("nan"))
    out_p.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for want, got in zip(eager, (out_d, out_p, kc, ks)):
        assert torch.equal(bits(got), bits(want))
    # Decode and a one-token-per-sequence prefill attend to the same keys.
    torch.testing.assert_close(out_d.float(), out_p.float(), atol=2e-2, rtol=2e-2)
