"""Paged attention (decode and prefill) against the fp64 reference, and its input validation, on
every device present (inputs are made on the CPU, moved to the device; the reference runs on the
CPU copies)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import sagellm.ops as sagellm_ops
from sagellm.ops import attention as ops
from sagellm.ops.reference import attention as ref
from sagellm.ops.reference import cache as ref_cache
from tests.ops.tolerances import DTYPES, poisoned, tol

HAVE_CUDA = torch.cuda.is_available() and sagellm_ops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

HEAD_SIZES = [64, 80, 96, 128, 256]
# (num_heads, num_kv_heads): MHA, GQA 4, GQA 7, MQA.
GQA = [(4, 4), (8, 2), (14, 2), (4, 1)]


def make_cache(
    seq_lens, num_kv_heads, head_size, block_size, dtype, spare_blocks=3, spare_columns=2
):
    """Random K/V caches and a block table of shuffled block ids; unused entries hold garbage."""
    used = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(used) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape).to(dtype)
    value_cache = torch.randn(shape).to(dtype)
    ids = torch.randperm(num_blocks, dtype=torch.int32)
    max_blocks = max(used, default=0) + spare_columns
    block_tables = torch.randint(-(2**30), 2**30, (len(seq_lens), max_blocks), dtype=torch.int32)
    start = 0
    for i, n in enumerate(used):
        block_tables[i, :n] = ids[start : start + n]
        start += n
    return key_cache, value_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


def query_start_loc(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@contextlib.contextmanager
def index_checks(device, enabled=True):
    """CUDA ops check index values only on request: turn it on for bad-input tests."""
    if device != "cuda":
        yield
        return
    before = sagellm_ops.cuda_index_checks()
    sagellm_ops.set_cuda_index_checks(enabled)
    try:
        yield
    finally:
        sagellm_ops.set_cuda_index_checks(before)


def check_decode(seq_lens, heads, head_size, block_size, dtype, device="cpu", cache_kw=None, **kw):
    num_heads, num_kv_heads = heads
    kc, vc, bt, sl = make_cache(
        seq_lens, num_kv_heads, head_size, block_size, dtype, **(cache_kw or {})
    )
    query = torch.randn(len(seq_lens), num_heads, head_size).to(dtype)
    out = poisoned(*query.shape, dtype=dtype, device=device)
    scale = head_size**-0.5
    got = ops.paged_attention_decode(*on(device, query, kc, vc, bt, sl), scale, out=out, **kw)
    assert got is out
    want = ref.paged_attention_decode(query, kc, vc, bt, sl, scale, **kw)
    torch.testing.assert_close(out.cpu(), want, **tol(dtype))


def check_prefill(seq_lens, q_lens, heads, head_size, block_size, dtype, device="cpu", **kw):
    num_heads, num_kv_heads = heads
    kc, vc, bt, sl = make_cache(seq_lens, num_kv_heads, head_size, block_size, dtype)
    qsl = query_start_loc(q_lens)
    query = torch.randn(sum(q_lens), num_heads, head_size).to(dtype)
    out = poisoned(*query.shape, dtype=dtype, device=device)
    scale = head_size**-0.5
    ops.paged_attention_prefill(*on(device, query, kc, vc, bt, sl, qsl), scale, out=out, **kw)
    want = ref.paged_attention_prefill(query, kc, vc, bt, sl, qsl, scale, **kw)
    torch.testing.assert_close(out.cpu(), want, **tol(dtype))


@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(dtype, head_size, heads, device, seeded):
    block_size = {64: 16, 80: 5, 96: 32, 128: 16, 256: 32}[head_size]
    check_decode([1, 37, 290, 16, 517], heads, head_size, block_size, dtype, device)


@pytest.mark.parametrize("block_size", [1, 5, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_block_sizes(dtype, block_size, device, seeded):
    check_decode([3, 64, 100, 33], (8, 2), 128, block_size, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long_ragged(dtype, device, seeded):
    check_decode([1, 4000, 2333, 17, 600], (2, 1), 64, 16, dtype, device)


# Few (sequence, kv head) pairs for the threads: the context is split into parts that a merge
# pass combines; short sequences of the batch leave some of their parts empty.
@pytest.mark.parametrize("seq_lens", [[600], [3001], [1, 3000, 700]])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_context(dtype, seq_lens, device, seeded):
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the split depends on the thread count; make it happen everywhere
    try:
        check_decode(seq_lens, (7, 1), 128, 16, dtype, device)
    finally:
        torch.set_num_threads(threads)


# More query heads per KV head than one tile holds (32 rows): the group is split over tiles.
@pytest.mark.parametrize("heads", [(40, 1), (96, 2)])
def test_large_gqa_groups(heads, device, seeded):
    check_decode([1, 70, 300], heads, 64, 16, torch.float32, device)
    check_prefill([1, 70, 300], [1, 3, 20], heads, 64, 16, torch.float32, device)


@pytest.mark.parametrize(
    ("sliding_window", "soft_cap", "seq_lens"),
    [
        (1, None, [1, 50, 300]),
        (37, None, [1, 36, 37, 38, 500]),
        (None, 5.0, [1, 80, 700]),
        (100, 30.0, [2, 99, 3000]),
        (1000, 1.0, [3001]),  # split context with a window
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_window_and_soft_cap(dtype, sliding_window, soft_cap, seq_lens, device, seeded):
    check_decode(
        seq_lens, (6, 2), 80, 16, dtype, device, sliding_window=sliding_window, soft_cap=soft_cap
    )


# (seq_len, q_len): a whole prompt, a prompt after a cached prefix, a zero-length sequence,
# a single token, a short extend of a long context.
PREFILL_SEQS = [(40, 40), (300, 123), (17, 0), (1, 1), (700, 5)]


@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(dtype, head_size, heads, device, seeded):
    block_size = {64: 32, 80: 16, 96: 5, 128: 32, 256: 16}[head_size]
    seq_lens, q_lens = zip(*PREFILL_SEQS, strict=True)
    check_prefill(list(seq_lens), list(q_lens), heads, head_size, block_size, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_long(dtype, device, seeded):
    # A 2048-token prompt and a 512-token chunk after a 2500-token cached prefix.
    check_prefill([2048, 3012], [2048, 512], (3, 1), 64, 16, dtype, device)


@pytest.mark.parametrize(
    ("sliding_window", "soft_cap"), [(1, None), (29, None), (None, 20.0), (64, 3.0)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_window_and_soft_cap(dtype, sliding_window, soft_cap, device, seeded):
    check_prefill(
        [200, 500, 60],
        [200, 70, 1],
        (9, 3),
        64,
        16,
        dtype,
        device,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )


def test_chunked_prefill_matches_whole_prompt(device, seeded):
    """The same prompt prefilled in three chunks (growing seq_lens) or in one call."""
    dtype, heads, head_size = torch.float32, (4, 2), 96
    total = 333
    kc, vc, bt, _ = make_cache([total], heads[1], head_size, 16, dtype)
    query = torch.randn(total, heads[0], head_size)
    whole = ref.paged_attention_prefill(
        query, kc, vc, bt, torch.tensor([total], dtype=torch.int32), query_start_loc([total]), 0.1
    )
    for begin, end in [(0, 100), (100, 101), (101, total)]:
        out = ops.paged_attention_prefill(
            *on(
                device,
                query[begin:end],
                kc,
                vc,
                bt,
                torch.tensor([end], dtype=torch.int32),
                query_start_loc([end - begin]),
            ),
            0.1,
        )
        torch.testing.assert_close(out.cpu(), whole[begin:end], **tol(dtype))


def test_strided_query_and_out(device, seeded):
    """query sliced out of a fused qkv tensor, every other head; out a slice of a wider buffer."""
    dtype, num_heads, num_kv_heads, head_size = torch.bfloat16, 8, 2, 64
    kc, vc, bt, sl = make_cache([10, 90], num_kv_heads, head_size, 16, dtype)
    cache = on(device, kc, vc, bt, sl)
    qkv = torch.randn(2, 2 * num_heads + 2 * num_kv_heads, head_size).to(dtype)
    query = qkv.to(device)[:, : 2 * num_heads : 2]
    assert query.stride() == ((2 * num_heads + 2 * num_kv_heads) * head_size, 2 * head_size, 1)
    wide = poisoned(2, num_heads, 3 * head_size, dtype=dtype, device=device)
    out = wide[:, :, head_size : 2 * head_size]
    ops.paged_attention_decode(query, *cache, 0.125, out=out)
    want = ref.paged_attention_decode(qkv[:, : 2 * num_heads : 2], kc, vc, bt, sl, 0.125)
    torch.testing.assert_close(out.cpu(), want, **tol(dtype))
    assert wide[:, :, :head_size].isnan().all() and wide[:, :, 2 * head_size :].isnan().all()

    qsl = query_start_loc([1, 2])
    qkv = torch.randn(3, num_heads + 2 * num_kv_heads, head_size).to(dtype)
    query = qkv.to(device)[:, :num_heads]
    out = ops.paged_attention_prefill(query, *cache, qsl.to(device), 0.125)
    assert out.is_contiguous()
    want = ref.paged_attention_prefill(qkv[:, :num_heads], kc, vc, bt, sl, qsl, 0.125)
    torch.testing.assert_close(out.cpu(), want, **tol(dtype))


@pytest.mark.parametrize(
    ("heads", "head_size"), [((14, 2), 80), ((4, 1), 128), ((2, 2), 256), ((32, 1), 64)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa(cpu_isa, dtype, heads, head_size, seeded):
    check_decode([1, 45, 333], heads, head_size, 16, dtype, soft_cap=10.0)
    check_decode([1300], heads, head_size, 5, dtype, sliding_window=900)
    check_prefill([50, 260, 9], [50, 33, 0], heads, head_size, 32, dtype, sliding_window=40)


def test_opcheck(device, seeded):
    kc, vc, bt, sl = on(device, *make_cache([5, 20], 2, 64, 16, torch.float32))
    query = torch.randn(2, 4, 64, device=device)
    out = torch.empty_like(query)
    torch.library.opcheck(
        torch.ops.sagellm.paged_attention_decode, (out, query, kc, vc, bt, sl, 0.125, -1, 0.0)
    )
    qsl = query_start_loc([5, 3]).to(device)
    query = torch.randn(8, 4, 64, device=device)
    out = torch.empty_like(query)
    torch.library.opcheck(
        torch.ops.sagellm.paged_attention_prefill,
        (out, query, kc, vc, bt, sl, qsl, 0.125, 16, 30.0),
    )


# ---- CUDA: shapes of real models, split-KV, graphs -------------------------------------------
# The CUDA decode kernel splits a context into partitions when the (sequence, KV head) pairs alone
# would leave the GPU idle, so short batches with long contexts exercise the split and its reduce
# pass, and B = 64 x 8 KV heads runs unsplit; block sizes that are not a multiple of 16 take the
# per-row block lookup instead of the one-lookup-per-tile path.


@needs_cuda
@pytest.mark.parametrize("block_size", [16, 32, 7])
@pytest.mark.parametrize("heads", [(32, 8), (8, 1), (4, 4)])
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_cuda_shapes(dtype, head_size, heads, block_size, seeded):
    check_decode([1, 17, 300, 1000, 2500], heads, head_size, block_size, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("heads", [(24, 2), (40, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_cuda_head_tiles(dtype, heads, seeded):
    # More than 8 query heads per KV head: the group is split over several CTAs.
    check_decode([1, 300, 2000], heads, 128, 16, dtype, "cuda")
    check_decode([1, 300, 2000], heads, 64, 5, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_cuda_long_context(dtype, seeded):
    # 8192 keys: many partitions; the 1-token sequence has a single one and skips the reduce.
    check_decode([8192, 8191, 1, 4000], (32, 8), 128, 16, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize(("block_size", "dtype"), [(16, torch.bfloat16), (32, torch.float16)])
def test_decode_cuda_large_batch(block_size, dtype, seeded):
    seq_lens = torch.randint(1, 2049, (64,)).tolist()
    check_decode(seq_lens, (32, 8), 128, block_size, dtype, "cuda")


@needs_cuda
def test_decode_cuda_wide_block_table(seeded):
    # An engine-style table sized for the longest context a model allows, mostly unused: the
    # partitions planned from its width past each sequence's end must do nothing.
    check_decode(
        [3000, 5, 700],
        (8, 2),
        128,
        16,
        torch.bfloat16,
        "cuda",
        cache_kw={"spare_columns": 2000},
    )


@needs_cuda
@pytest.mark.parametrize(
    ("sliding_window", "soft_cap"), [(4096, None), (None, 50.0), (1000, 30.0), (1, None)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_cuda_window_and_soft_cap(dtype, sliding_window, soft_cap, seeded):
    check_decode(
        [8192, 3000, 5, 1],
        (32, 8),
        128,
        16,
        dtype,
        "cuda",
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )


@needs_cuda
def test_decode_cuda_graph_replay(seeded):
    """Captured once, replayed on new lengths and block tables of the same shapes: the launch
    depends on shapes only (and index checks stay off inside the capture even when enabled)."""
    dtype, heads, head_size = torch.bfloat16, (8, 2), 128
    kc, vc, bt, sl = make_cache([3000, 40, 700], heads[1], head_size, 16, dtype)
    query = torch.randn(3, heads[0], head_size).to(dtype)
    static = on("cuda", query, kc, vc, bt, sl)
    out = torch.empty(query.shape, dtype=dtype, device="cuda")
    scale = head_size**-0.5

    def step():
        ops.paged_attention_decode(*static, scale, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with index_checks("cuda"), torch.cuda.graph(graph):
        step()

    order = [2, 0, 1]
    query2 = torch.randn_like(query.float()).to(dtype)
    for buf, new in zip(static, (query2, kc, vc, bt[order], sl[order]), strict=True):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    want = ref.paged_attention_decode(query2, kc, vc, bt[order], sl[order], scale)
    torch.testing.assert_close(out.cpu(), want, **tol(dtype))


# ---- bad input ---------------------------------------------------------------------------------


def _decode_args():
    kc, vc, bt, sl = make_cache([5, 40, 17], 2, 64, 16, torch.float32)
    query = torch.randn(3, 4, 64)
    return dict(
        out=torch.empty_like(query),
        query=query,
        key_cache=kc,
        value_cache=vc,
        block_tables=bt,
        seq_lens=sl,
        scale=0.125,
        sliding_window=-1,
        soft_cap=0.0,
    )


def _prefill_args():
    args = _decode_args()
    args["query"] = torch.randn(9, 4, 64)
    args["out"] = torch.empty_like(args["query"])
    return {**args, "query_start_loc": query_start_loc([5, 3, 1])}


def _set(**changes):
    return lambda a: {**a, **changes}


def _with(name, fn):
    return lambda a: {**a, name: fn(a[name])}


def _set_block(seq, index, value):
    def change(a):
        bt = a["block_tables"].clone()
        bt[seq, index] = value
        return {**a, "block_tables": bt}

    return change


SHAPE_BAD = [
    (
        _with("query", lambda t: t.double()),
        "query has dtype Double; expected float32, float16 or bfloat16",
    ),
    (_with("key_cache", lambda t: t.half()), "key_cache must have the dtype of query"),
    (_with("value_cache", lambda t: t.bfloat16()), "value_cache must have the dtype of query"),
    (_with("out", lambda t: t.half()), "out must have the dtype of query"),
    (_with("block_tables", lambda t: t.long()), "block_tables must be int32"),
    (_with("seq_lens", lambda t: t.long()), "seq_lens must be int32"),
    (_with("query", lambda t: t[0]), "query must be 3-D"),
    (_with("out", lambda t: t[:, :2]), "out must have the shape of query"),
    (_with("key_cache", lambda t: t[0]), "key_cache must be 4-D"),
    (_with("value_cache", lambda t: t[:, :8]), "value_cache must have the shape of key_cache"),
    (_with("block_tables", lambda t: t[0]), "block_tables must be 2-D"),
    (_with("seq_lens", lambda t: t[None]), "seq_lens must be 1-D"),
    (_with("block_tables", lambda t: t[:2]), "block_tables has 2 rows but seq_lens has 3"),
    (
        lambda a: {
            **a,
            "key_cache": a["key_cache"][..., :32].contiguous(),
            "value_cache": a["value_cache"][..., :32].contiguous(),
        },
        "key_cache head_size 32 does not match query head_size 64",
    ),
    (
        lambda a: {
            **a,
            "query": torch.randn(a["query"].shape[0], 4, 72),
            "out": torch.empty(a["query"].shape[0], 4, 72),
            "key_cache": torch.randn(10, 16, 2, 72),
            "value_cache": torch.randn(10, 16, 2, 72),
        },
        r"head_size 72 is not supported; supported: 64, 80, 96, 128, 256",
    ),
    (
        lambda a: {**a, "query": a["query"][:, :3], "out": a["out"][:, :3]},
        r"num_heads \(query.size\(1\) = 3\) must be a positive multiple of num_kv_heads",
    ),
    (
        lambda a: {**a, "key_cache": a["key_cache"].transpose(0, 1).contiguous().transpose(0, 1)},
        "key_cache must be contiguous",
    ),
    (
        lambda a: {
            **a,
            "value_cache": a["value_cache"].transpose(0, 1).contiguous().transpose(0, 1),
        },
        "value_cache must be contiguous",
    ),
    (
        _with("query", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
        "query must have a contiguous head_size dim",
    ),
    (
        _with("out", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
        "out must have a contiguous head_size dim",
    ),
    (_set(sliding_window=0), "sliding_window must be -1 \\(off\\) or >= 1, got 0"),
    (_set(sliding_window=-2), "sliding_window must be -1"),
    (_set(soft_cap=-1.0), "soft_cap must be >= 0"),
    (_set(scale=float("nan")), "scale must be finite"),
]

# Index values: checked on the host; on CUDA only with set_cuda_index_checks(True).
VALUE_BAD = [
    (_set_block(1, 2, 9001), r"block_tables\[1, 2\] = 9001 is out of range \[0, 9\)"),
    (_set_block(2, 0, -1), r"block_tables\[2, 0\] = -1 is out of range \[0, 9\)"),
    (
        _with("seq_lens", lambda t: torch.tensor([5, 40, 10**6], dtype=torch.int32)),
        r"seq_lens\[2\] = 1000000 exceeds the block table's capacity",
    ),
    (
        _with("seq_lens", lambda t: torch.tensor([5, -3, 17], dtype=torch.int32)),
        r"seq_lens\[1\] = -3 must be >= ",
    ),
]


def _on(device, args):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _call(op, change, device):
    if op == "decode":
        return torch.ops.sagellm.paged_attention_decode(**_on(device, change(_decode_args())))
    return torch.ops.sagellm.paged_attention_prefill(**_on(device, change(_prefill_args())))


@pytest.mark.parametrize(("change", "match"), SHAPE_BAD + VALUE_BAD)
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_bad_input(op, change, match, device):
    with index_checks(device), pytest.raises(RuntimeError, match=match):
        _call(op, change, device)


@needs_cuda
@pytest.mark.parametrize(("change", "match"), SHAPE_BAD)
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_bad_shapes_without_index_checks_cuda(op, change, match):
    """Shapes, dtypes, strides and scalars are checked on CUDA even with index checks off."""
    with index_checks("cuda", enabled=False), pytest.raises(RuntimeError, match=match):
        _call(op, change, "cuda")


@needs_cuda
@pytest.mark.parametrize("name", ["out", "key_cache", "value_cache", "block_tables", "seq_lens"])
def test_cuda_tensors_on_another_device(name):
    args = _on("cuda", _decode_args())
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} must be on cuda:0 \\(the device of query\\)"):
        torch.ops.sagellm.paged_attention_decode(**args)
    args = _on("cuda", _prefill_args())
    args["query_start_loc"] = args["query_start_loc"].cpu()
    with pytest.raises(RuntimeError, match="query_start_loc must be on cuda:0"):
        torch.ops.sagellm.paged_attention_prefill(**args)
    args = _on("cuda", _decode_args())
    args["query"] = args["query"].cpu()
    with pytest.raises(RuntimeError, match="query must be on a CUDA device, got cpu"):
        torch.ops.sagellm.paged_attention_decode(**args)


def _qsl(*values):
    return _set(query_start_loc=torch.tensor(values, dtype=torch.int32))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_with("query_start_loc", lambda t: t.long()), "query_start_loc must be int32"),
        (_with("query_start_loc", lambda t: t[None]), "query_start_loc must be 1-D"),
        (_qsl(0, 5, 9), "query_start_loc must have num_seqs \\+ 1 = 4 entries, got 3"),
        (_qsl(1, 5, 8, 9), r"query_start_loc\[0\] must be 0, got 1"),
        (_qsl(0, 4, 3, 9), "query_start_loc must be nondecreasing"),
        (_qsl(0, 5, 8, 8), r"query_start_loc\[3\] = 8 must equal the number of query tokens 9"),
        (
            _qsl(0, 6, 8, 9),
            r"sequence 0 has 6 new tokens \(query_start_loc\) but seq_lens\[0\] = 5",
        ),
    ],
)
def test_bad_prefill_input(change, match, device):
    with index_checks(device), pytest.raises(RuntimeError, match=match):
        _call("prefill", change, device)


def test_bad_decode_input(device):
    args = _on(device, _decode_args())
    with pytest.raises(RuntimeError, match="query has 2 tokens but seq_lens has 3 sequences"):
        torch.ops.sagellm.paged_attention_decode(
            **{**args, "query": args["query"][:2], "out": args["out"][:2]}
        )
    bad_len = torch.tensor([5, 0, 17], dtype=torch.int32, device=device)
    with index_checks(device), pytest.raises(RuntimeError, match=r"seq_lens\[1\] = 0 must be >= 1"):
        torch.ops.sagellm.paged_attention_decode(**{**args, "seq_lens": bad_len})


def test_empty_batch_and_zero_length_prefill(device, seeded):
    args = _prefill_args()
    args["query_start_loc"] = query_start_loc([5, 0, 4])
    args["seq_lens"] = torch.tensor([5, 0, 17], dtype=torch.int32)
    args["out"] = poisoned(*args["query"].shape, dtype=torch.float32)
    args = _on(device, args)
    torch.ops.sagellm.paged_attention_prefill(**args)
    assert not args["out"].isnan().any()

    empty = {**args, "query": args["query"][:0], "out": args["out"][:0]}
    empty.update(block_tables=args["block_tables"][:0], seq_lens=args["seq_lens"][:0])
    empty_qsl = query_start_loc([]).to(device)
    torch.ops.sagellm.paged_attention_prefill(**{**empty, "query_start_loc": empty_qsl})
    del empty["query_start_loc"]
    torch.ops.sagellm.paged_attention_decode(**empty)


# ---- quantized KV cache (int8 / float8_e4m3fn, fp32 scale per cached token and KV head) --------
# The caches are quantized by the write rule's reference; the op is compared (1) with the
# reference run on the SAME dequantized cache, to the query dtype's usual tolerance (fp32: 1e-5:
# only the order of the fp32 rounding differs), and (2) with the reference on the unquantized
# cache, within QUANT_VS_FP below (what quantization itself costs on N(0, 1) keys and values).

KV_QUANT = [torch.int8, torch.float8_e4m3fn]
# int8 rounds each element by at most s/2 = max|row| / 254; e4m3 by 2^-4 of the element (3
# mantissa bits); the keys' error also moves the softmax weights. Measured over all head sizes,
# GQA ratios and dtypes of these tests (beyond the rtol part): int8 0.029, e4m3 0.114 at worst.
QUANT_VS_FP = {
    torch.int8: {"atol": 0.06, "rtol": 0.01},
    torch.float8_e4m3fn: {"atol": 0.2, "rtol": 0.0625},
}


def quantize_cache(kc, vc, kv_dtype):
    kq, ks = ref_cache.quantize_kv(kc, kv_dtype)
    vq, vs = ref_cache.quantize_kv(vc, kv_dtype)
    return kq, vq, ks, vs


def check_quant(
    kind, seq_lens, heads, head_size, block_size, dtype, kv_dtype, device="cpu", q_lens=None, **kw
):
    num_heads, num_kv_heads = heads
    kc, vc, bt, sl = make_cache(seq_lens, num_kv_heads, head_size, block_size, torch.float32)
    kq, vq, ks, vs = quantize_cache(kc, vc, kv_dtype)
    scale = head_size**-0.5
    if kind == "decode":
        query = torch.randn(len(seq_lens), num_heads, head_size).to(dtype)
        extra, op, ref_op = (), ops.paged_attention_decode, ref.paged_attention_decode
    else:
        query = torch.randn(sum(q_lens), num_heads, head_size).to(dtype)
        extra, op, ref_op = (
            (query_start_loc(q_lens),),
            ops.paged_attention_prefill,
            (ref.paged_attention_prefill),
        )
    out = poisoned(*query.shape, dtype=dtype, device=device)
    dev = on(device, query, kq, vq, bt, sl, *extra)
    op(*dev, scale, out=out, k_scales=ks.to(device), v_scales=vs.to(device), **kw)
    same = ref_op(query, kq, vq, bt, sl, *extra, scale, k_scales=ks, v_scales=vs, **kw)
    torch.testing.assert_close(out.cpu(), same, **tol(dtype))
    unquantized = ref_op(query, kc, vc, bt, sl, *extra, scale, **kw)
    loose = {k: v + tol(dtype)[k] for k, v in QUANT_VS_FP[kv_dtype].items()}
    torch.testing.assert_close(out.cpu().float(), unquantized.float(), **loose)


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_quantized(dtype, head_size, heads, kv_dtype, device, seeded):
    block_size = {64: 16, 80: 5, 96: 32, 128: 16, 256: 32}[head_size]
    check_quant(
        "decode", [1, 37, 290, 16, 517], heads, head_size, block_size, dtype, kv_dtype, device
    )


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (14, 2)])
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_quantized(dtype, head_size, heads, kv_dtype, device, seeded):
    block_size = {64: 32, 80: 16, 96: 5, 128: 32, 256: 16}[head_size]
    seq_lens, q_lens = zip(*PREFILL_SEQS, strict=True)
    check_quant(
        "prefill",
        list(seq_lens),
        heads,
        head_size,
        block_size,
        dtype,
        kv_dtype,
        device,
        q_lens=list(q_lens),
    )


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
@pytest.mark.parametrize(
    ("sliding_window", "soft_cap", "seq_lens"),
    [(37, None, [1, 36, 38, 500]), (None, 5.0, [1, 80, 700]), (1000, 1.0, [3001])],
)
def test_quantized_window_soft_cap_and_split(
    kv_dtype, sliding_window, soft_cap, seq_lens, device, seeded
):
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # long contexts split into merged parts
    try:
        kw = dict(sliding_window=sliding_window, soft_cap=soft_cap)
        check_quant("decode", seq_lens, (7, 1), 128, 16, torch.bfloat16, kv_dtype, device, **kw)
        check_quant(
            "prefill",
            seq_lens,
            (9, 3),
            64,
            16,
            torch.float32,
            kv_dtype,
            device,
            q_lens=[min(n, 70) for n in seq_lens],
            **kw,
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
@pytest.mark.parametrize(("heads", "head_size"), [((14, 2), 80), ((4, 1), 128), ((2, 2), 256)])
def test_quantized_every_isa(cpu_isa, kv_dtype, heads, head_size, seeded):
    for dtype in DTYPES:
        check_quant("decode", [1, 45, 333], heads, head_size, 16, dtype, kv_dtype, soft_cap=10.0)
        check_quant(
            "prefill",
            [50, 260, 9],
            heads,
            head_size,
            32,
            dtype,
            kv_dtype,
            q_lens=[50, 33, 0],
            sliding_window=40,
        )


def test_quantized_zero_rows(device, seeded):
    # All-zero keys/values are stored with scale 0: scores 0, values 0 (no NaN from 0 * inf).
    kc, vc, bt, sl = make_cache([20], 1, 64, 16, torch.float32)
    kc[bt[0, 0]] = 0.0
    vc[bt[0, 0]] = 0.0
    kq, vq, ks, vs = quantize_cache(kc, vc, torch.int8)
    assert (ks[bt[0, 0]] == 0).all()
    query = torch.randn(1, 2, 64)
    out = ops.paged_attention_decode(
        *on(device, query, kq, vq, bt, sl), 0.125, k_scales=ks.to(device), v_scales=vs.to(device)
    )
    want = ref.paged_attention_decode(query, kq, vq, bt, sl, 0.125, k_scales=ks, v_scales=vs)
    torch.testing.assert_close(out.cpu(), want, **tol(torch.float32))


def _quant_args(kv_dtype=torch.int8):
    args = _decode_args()
    kq, vq, ks, vs = quantize_cache(args["key_cache"], args["value_cache"], kv_dtype)
    return {**args, "key_cache": kq, "value_cache": vq, "k_scales": ks, "v_scales": vs}


QUANT_BAD = [
    (_set(k_scales=None), "k_scales and v_scales are required; got no k_scales and v_scales"),
    (_set(v_scales=None), "k_scales and v_scales are required; got k_scales and no v_scales"),
    (_set(k_scales=None, v_scales=None), "k_scales and v_scales are required"),
    (_with("k_scales", lambda t: t.half()), "k_scales has dtype Half; expected float32"),
    (_with("v_scales", lambda t: t[:, :8]), r"v_scales has shape \[9, 8, 2\]; expected"),
    (
        _with("k_scales", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
        "k_scales must be contiguous",
    ),
    (
        _with("value_cache", lambda t: t.view(torch.float8_e4m3fn)),
        "value_cache has dtype Float8_e4m3fn but key_cache has dtype Char",
    ),
    (
        lambda a: {
            **a,
            "key_cache": a["key_cache"].float(),
            "value_cache": a["value_cache"].float(),
        },
        "k_scales/v_scales are only taken with an int8 or float8_e4m3fn cache",
    ),
    (
        _with("key_cache", lambda t: t.view(torch.uint8)),
        "key_cache must have the dtype of query",
    ),
]


@pytest.mark.parametrize(("change", "match"), QUANT_BAD)
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_quantized_bad_input(op, change, match, device):
    args = _quant_args()
    if op == "prefill":
        args = {
            **_prefill_args(),
            **{k: args[k] for k in ("key_cache", "value_cache", "k_scales", "v_scales")},
        }
    args = _on(device, change(args))
    fn = (
        torch.ops.sagellm.paged_attention_decode
        if op == "decode"
        else (torch.ops.sagellm.paged_attention_prefill)
    )
    with pytest.raises(RuntimeError, match=match):
        fn(**args)


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
def test_opcheck_quantized(kv_dtype, device, seeded):
    args = _on(device, _quant_args(kv_dtype))
    # torch's schema check compares tensors with ops float8 lacks on the CPU: skip that one.
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    if kv_dtype == torch.int8:
        utils = ("test_schema", *utils)
    torch.library.opcheck(
        torch.ops.sagellm.paged_attention_decode.default, (), args, test_utils=utils
    )
