"""reshape_and_cache, copy_blocks and swap_blocks against the pure-torch reference (exact), on
every device present; swap_blocks also between the CPU and the GPU, both ways."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sagellm import ops
from sagellm.ops import cache
from sagellm.ops.reference import cache as ref
from tests.ops.tolerances import DTYPES

HAVE_CUDA = torch.cuda.is_available() and ops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

SENTINEL = 7.0  # caches start full of it, so an untouched slot is recognisable


def _caches(num_blocks, block_size, heads, head_size, dtype, device="cpu"):
    shape = (num_blocks, block_size, heads, head_size)
    return (
        torch.full(shape, SENTINEL, dtype=dtype, device=device),
        torch.full(shape, -SENTINEL, dtype=dtype, device=device),
    )


@contextlib.contextmanager
def index_checks(device, enabled=True):
    """CUDA ops check index values only on request: turn it on (or off) for a test."""
    if device != "cuda":
        yield
        return
    before = ops.cuda_index_checks()
    ops.set_cuda_index_checks(enabled)
    try:
        yield
    finally:
        ops.set_cuda_index_checks(before)


def _expected_cache_write(key, cache_, slots):
    """The reference's result, vectorised (the reference loops over tokens in Python)."""
    out = cache_.clone()
    flat = out.view(-1, *out.shape[2:])
    keep = slots >= 0
    flat[slots[keep]] = key[keep]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,head_size", [(1, 64), (2, 80), (8, 128), (3, 7)])
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
def test_reshape_and_cache(device, dtype, block_size, heads, head_size, num_tokens):
    g = torch.Generator().manual_seed(num_tokens + heads)
    num_blocks = 6
    key = torch.randn(num_tokens, heads, head_size, generator=g).to(dtype)
    value = torch.randn(num_tokens, heads, head_size, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::5] = -1  # padding tokens
    kc, vc = _caches(num_blocks, block_size, heads, head_size, dtype)
    ek, ev = ref.reshape_and_cache(key, value, kc, vc, slots)
    key, value, kc, vc, slots = (t.to(device) for t in (key, value, kc, vc, slots))
    cache.reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kc.cpu(), ek) and torch.equal(vc.cpu(), ev)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots.cpu()[slots.cpu() >= 0]] = True
    assert (kc.cpu().view(-1, heads, head_size)[~written] == SENTINEL).all()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_size", [(8, 128), (1, 64), (4, 80), (3, 7), (2, 9)])
@pytest.mark.parametrize("num_tokens", [1, 1027, 8191])
def test_cuda_reshape_and_cache_large(dtype, heads, head_size, num_tokens):
    # Many tokens into a big cache; head sizes whose rows are 16-, 8-, 2- or 1-element units.
    g = torch.Generator().manual_seed(num_tokens * heads)
    block_size, num_blocks = 16, 1024
    key = torch.randn(num_tokens, heads, head_size, generator=g).to(dtype).cuda()
    value = torch.randn(num_tokens, heads, head_size, generator=g).to(dtype).cuda()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[1::7] = -1
    slots = slots.cuda()
    kc, vc = _caches(num_blocks, block_size, heads, head_size, dtype, device="cuda")
    ek, ev = _expected_cache_write(key, kc, slots), _expected_cache_write(value, vc, slots)
    cache.reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


@pytest.mark.parametrize("three_d_slices", [False, True])
def test_reshape_and_cache_from_qkv_slices(device, three_d_slices):
    # key/value as views of a fused qkv buffer: strided tokens, and (3-d case) strided heads.
    tokens, heads, kv_heads, d = 9, 4, 2, 64
    qkv = torch.randn(tokens, heads + 2 * kv_heads, d).to(torch.bfloat16)
    if three_d_slices:
        key, value = qkv[:, heads : heads + 2 * kv_heads : 2], qkv[:, heads + 1 :: 2]
    else:
        key, value = qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    slots = torch.tensor([3, 17, -1, 40, 0, 63, 1, 2, 33])
    kc, vc = _caches(4, 16, kv_heads, d, torch.bfloat16)
    ek, ev = ref.reshape_and_cache(key, value, kc, vc, slots)
    qkv_d = qkv.to(device)
    if three_d_slices:
        key, value = qkv_d[:, heads : heads + 2 * kv_heads : 2], qkv_d[:, heads + 1 :: 2]
    else:
        key, value = qkv_d[:, heads : heads + kv_heads], qkv_d[:, heads + kv_heads :]
    kc, vc, slots = kc.to(device), vc.to(device), slots.to(device)
    cache.reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kc.cpu(), ek) and torch.equal(vc.cpu(), ev)


def test_reshape_and_cache_bad_inputs(device):
    key = torch.randn(3, 2, 16, device=device)
    kc, vc = _caches(2, 16, 2, 16, torch.float32, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    op = cache.reshape_and_cache

    def tensor(values):
        return torch.tensor(values, device=device)

    with index_checks(device):
        with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 32 is out of range \[0, 32\)"):
            op(key, key, kc, vc, tensor([0, 32, 1]))
        with pytest.raises(RuntimeError, match=r"slot_mapping\[2\] = -2"):
            op(key, key, kc, vc, tensor([0, 1, -2]))
    assert (kc == SENTINEL).all()  # a rejected call writes nothing
    with pytest.raises(RuntimeError, match="slot_mapping"):
        op(key, key, kc, vc, slots.int())
    with pytest.raises(RuntimeError, match="slot_mapping"):
        op(key, key, kc, vc, slots[:2])
    with pytest.raises(RuntimeError, match="key_cache"):
        op(key, key, kc.half(), vc.half(), slots)
    with pytest.raises(RuntimeError, match="value"):
        op(key, key.half(), kc, vc, slots)
    with pytest.raises(RuntimeError, match="value"):
        op(key, key[:, :1], kc, vc, slots)
    with pytest.raises(RuntimeError, match="key_cache"):
        op(key, key, kc[:, :, :1], vc[:, :, :1], slots)
    with pytest.raises(RuntimeError, match="key_cache"):
        op(key, key, kc.transpose(0, 1), vc.transpose(0, 1), slots)
    with pytest.raises(RuntimeError, match="key"):
        op(key.view(3, 32), key.view(3, 32), kc, vc, slots)
    with pytest.raises(RuntimeError, match="key"):
        op(key.transpose(1, 2).contiguous().transpose(1, 2), key, kc, vc, slots)


@needs_cuda
@pytest.mark.cuda
def test_cuda_unchecked_bad_slots_write_nothing():
    # With index checks off the values are never read on the host; the kernel skips slots out
    # of range instead of writing outside the cache.
    key = torch.randn(3, 2, 16, device="cuda")
    kc, vc = _caches(2, 16, 2, 16, torch.float32, device="cuda")
    with index_checks("cuda", enabled=False):
        cache.reshape_and_cache(key, key, kc, vc, torch.tensor([32, -2, 1 << 40], device="cuda"))
    assert (kc == SENTINEL).all() and (vc == -SENTINEL).all()


@needs_cuda
@pytest.mark.cuda
def test_cuda_cache_ops_reject_mixed_devices():
    key = torch.randn(3, 2, 16, device="cuda")
    kc, vc = _caches(2, 16, 2, 16, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r"slot_mapping is on cpu but key_cache is on cuda"):
        cache.reshape_and_cache(key, key, kc, vc, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"value_caches\[0\] is on cpu"):
        cache.copy_blocks([kc], [vc.cpu()], torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="block_mapping .*must be on the CPU"):
        cache.swap_blocks(kc, kc.cpu(), torch.tensor([[0, 1]], device="cuda"))


def _layers(layers, shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    kcs = [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(layers)]
    vcs = [torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(layers)]
    return kcs, vcs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mapping_on", ["cpu", "device"])
def test_copy_blocks_several_layers(device, dtype, mapping_on):
    kcs, vcs = _layers(3, (8, 16, 2, 64), dtype, device)
    # (1 -> 5) then (5 -> 6): pairs apply in order, so block 6 receives block 1.
    mapping = torch.tensor([[1, 5], [2, 0], [5, 6], [3, 3]])
    ek, ev = ref.copy_blocks(kcs, vcs, mapping)
    cache.copy_blocks(kcs, vcs, mapping.to(device) if mapping_on == "device" else mapping)
    for got, want in zip(kcs + vcs, ek + ev, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(kcs[0][6], kcs[0][1])


def _expected_copies(caches, mapping):
    """The reference's result with all caches stacked, one indexing op per pair."""
    stacked = torch.stack(caches)
    for src, dst in mapping.tolist():
        stacked[:, dst] = stacked[:, src]
    return list(stacked.unbind(0))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mapping_on", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "shape,dtype,layers",
    [
        ((64, 16, 8, 128), torch.bfloat16, 3),  # 32 KiB blocks in 16-byte units
        ((40, 5, 1, 7), torch.bfloat16, 130),  # 70-byte blocks: 2-byte units
        ((33, 3, 1, 1), torch.float32, 130),  # 4-byte units
        ((20, 5, 1, 3), torch.uint8, 5),  # 1-byte units (any dtype is copied as bytes)
    ],
)
def test_cuda_copy_blocks_many_pairs_and_layers(mapping_on, shape, dtype, layers):
    # 130 layers: two launches of up to 128 caches. 700 pairs: several shared-memory tiles and
    # load batches of the kernel, with chains inside and across batches and a destination
    # written again and again.
    kcs, vcs = _layers(layers, shape, dtype, "cuda", seed=shape[0])
    g = torch.Generator().manual_seed(7)
    mapping = torch.randint(0, shape[0], (700, 2), generator=g)
    mapping[10:20, 0] = mapping[9:19, 1].clone()  # each pair reads the previous one's dst
    mapping[300:305, 1] = 3
    expected = _expected_copies(kcs + vcs, mapping)
    cache.copy_blocks(kcs, vcs, mapping.to(mapping_on))
    for got, want in zip(kcs + vcs, expected, strict=True):
        assert torch.equal(got, want)


def test_copy_blocks_empty(device):
    kc = torch.randn(4, 16, 1, 8, device=device)
    before = kc.clone()
    cache.copy_blocks([kc], [kc.clone()], torch.zeros(0, 2, dtype=torch.int64))
    cache.copy_blocks([], [], torch.zeros(0, 2, dtype=torch.int64, device=device))
    assert torch.equal(kc, before)


@pytest.mark.parametrize("mapping_on", ["cpu", "device"])
def test_copy_blocks_bad_inputs(device, mapping_on):
    kcs = [torch.zeros(4, 16, 1, 8, device=device) for _ in range(2)]
    vcs = [torch.zeros(4, 16, 1, 8, device=device) for _ in range(2)]
    ok = torch.tensor([[0, 1]])

    def mapping(values, **kw):
        m = torch.tensor(values, **kw)
        return m.to(device) if mapping_on == "device" else m

    with index_checks(device):
        with pytest.raises(
            RuntimeError, match=r"block_mapping\[1, 1\] = 4 is out of range \[0, 4\)"
        ):
            cache.copy_blocks(kcs, vcs, mapping([[0, 1], [2, 4]]))
        with pytest.raises(RuntimeError, match=r"block_mapping\[0, 0\] = -1"):
            cache.copy_blocks(kcs, vcs, mapping([[-1, 1]]))
    with pytest.raises(RuntimeError, match="block_mapping"):
        cache.copy_blocks(kcs, vcs, mapping([[0, 1]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="block_mapping"):
        cache.copy_blocks(kcs, vcs, mapping([0, 1]))
    with pytest.raises(RuntimeError, match="value_caches"):
        cache.copy_blocks(kcs, vcs[:1], ok)
    with pytest.raises(RuntimeError, match=r"value_caches\[1\]"):
        cache.copy_blocks(kcs, [vcs[0], torch.zeros(5, 16, 1, 8, device=device)], ok)
    with pytest.raises(RuntimeError, match=r"key_caches\[1\]"):
        cache.copy_blocks([kcs[0], kcs[1].half()], vcs, ok)
    with pytest.raises(RuntimeError, match=r"key_caches\[0\]"):
        cache.copy_blocks([kcs[0].transpose(1, 2), kcs[1]], vcs, ok)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_blocks_between_caches_of_different_sizes(device, dtype):
    src = torch.randn(10, 16, 2, 32).to(dtype).to(device)
    dst = torch.full((6, 16, 2, 32), SENTINEL, dtype=dtype, device=device)
    mapping = torch.tensor([[9, 0], [3, 5], [0, 2]])
    expected = ref.swap_blocks(src, dst, mapping)
    cache.swap_blocks(src, dst, mapping)
    assert torch.equal(dst, expected)
    assert (dst[[1, 3, 4]] == SENTINEL).all()
    back = torch.zeros_like(src)
    cache.swap_blocks(dst, back, torch.tensor([[0, 9], [5, 3]]))
    assert torch.equal(back[9], src[9]) and torch.equal(back[3], src[3])


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("src_on,dst_on", [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")])
@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_swap_blocks_across_devices(src_on, dst_on, pinned):
    # Offload to host memory and back; runs of consecutive blocks become one copy each.
    src = torch.randn(300, 16, 8, 128).to(torch.bfloat16)
    dst = torch.full((200, 16, 8, 128), SENTINEL, dtype=torch.bfloat16)
    if pinned:
        src, dst = src.pin_memory(), dst.pin_memory()
    mapping = torch.tensor([[299, 0], [5, 7], [6, 8], [7, 9], [100, 199], [0, 1], [1, 2]])
    expected = ref.swap_blocks(src, dst, mapping)
    src, dst = src.to(src_on), dst.to(dst_on)
    cache.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


def test_swap_blocks_within_one_tensor_in_order(device):
    t = torch.arange(4.0, device=device).view(4, 1).repeat(1, 8)
    cache.swap_blocks(t, t, torch.tensor([[0, 1], [1, 2]]))
    assert torch.equal(t[:, 0].cpu(), torch.tensor([0.0, 0.0, 0.0, 3.0]))


def test_swap_blocks_bad_inputs(device):
    src = torch.zeros(10, 16, 8, device=device)
    dst = torch.zeros(6, 16, 8, device=device)
    with pytest.raises(RuntimeError, match=r"block_mapping\[0, 0\] = 10 is out of range \[0, 10\)"):
        cache.swap_blocks(src, dst, torch.tensor([[10, 0]]))
    with pytest.raises(RuntimeError, match=r"block_mapping\[1, 1\] = 6 is out of range \[0, 6\)"):
        cache.swap_blocks(src, dst, torch.tensor([[0, 0], [1, 6]]))
    with pytest.raises(RuntimeError, match="block_mapping"):
        cache.swap_blocks(src, dst, torch.tensor([[0, 0]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="dst"):
        cache.swap_blocks(src, torch.zeros(6, 16, 4, device=device), torch.tensor([[0, 0]]))
    with pytest.raises(RuntimeError, match="dst"):
        cache.swap_blocks(src, dst.half(), torch.tensor([[0, 0]]))
    with pytest.raises(RuntimeError, match="src"):
        cache.swap_blocks(src.transpose(1, 2), dst.transpose(1, 2), torch.tensor([[0, 0]]))


@needs_cuda
@pytest.mark.cuda
def test_cuda_ops_capture_in_a_graph():
    # The decode-step ops replay from a CUDA graph with fresh inputs written into the captured
    # buffers, index checks on (they are skipped while capturing, not a sync inside capture).
    key = torch.randn(4, 2, 16, device="cuda")
    kc, vc = _caches(8, 16, 2, 16, torch.float32, device="cuda")
    slots = torch.tensor([0, 17, -1, 40], device="cuda")
    mapping = torch.tensor([[0, 5]], device="cuda")
    with index_checks("cuda"):
        cache.reshape_and_cache(key, key, kc, vc, slots)  # warm-up (module load) outside
        cache.copy_blocks([kc], [vc], mapping)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cache.reshape_and_cache(key, key, kc, vc, slots)
            cache.copy_blocks([kc], [vc], mapping)
    kc.fill_(SENTINEL)
    vc.fill_(-SENTINEL)
    key.copy_(torch.randn(4, 2, 16))
    slots.copy_(torch.tensor([1, 2, 3, -1]))
    mapping.copy_(torch.tensor([[0, 7]]))
    graph.replay()
    k0, v0 = _caches(8, 16, 2, 16, torch.float32)
    ek, ev = ref.reshape_and_cache(key.cpu(), key.cpu(), k0, v0, slots.cpu())
    ek, ev = ref.copy_blocks([ek], [ev], mapping.cpu())
    assert torch.equal(kc.cpu(), ek[0]) and torch.equal(vc.cpu(), ev[0])


def test_opcheck(device):
    key = torch.randn(3, 2, 16, device=device)
    kc, vc = _caches(2, 16, 2, 16, torch.float32, device=device)
    torch.library.opcheck(
        torch.ops.sagellm.reshape_and_cache.default,
        (key, key.clone(), kc, vc, torch.tensor([0, -1, 5], device=device)),
    )
    kcs, vcs = _layers(2, (4, 16, 1, 8), torch.float32, device)
    torch.library.opcheck(torch.ops.sagellm.copy_blocks.default, (kcs, vcs, torch.tensor([[0, 1]])))
    torch.library.opcheck(
        torch.ops.sagellm.swap_blocks.default,
        (
            torch.randn(5, 16, 8, device=device),
            torch.zeros(3, 16, 8, device=device),
            torch.tensor([[4, 0], [1, 2]]),
        ),
    )


def test_traces_under_torch_compile(device):
    def write(key, kc, vc, slots):
        cache.reshape_and_cache(key, key * 2, kc, vc, slots)
        return kc.sum() + vc.sum()

    key = torch.randn(3, 2, 16, device=device)
    slots = torch.tensor([0, -1, 5], device=device)
    kc, vc = _caches(2, 16, 2, 16, torch.float32, device=device)
    ke, ve = kc.clone(), vc.clone()
    expected = write(key, ke, ve, slots)
    got = torch.compile(write, fullgraph=True, backend="aot_eager")(key, kc, vc, slots)
    torch.testing.assert_close(got, expected)
    assert torch.equal(kc, ke) and torch.equal(vc, ve)


# ---- quantized caches (int8 / float8_e4m3fn with fp32 scales per token and head) --------------

KV_QUANT = [torch.int8, torch.float8_e4m3fn]


def _bits(t):
    """Bit patterns, so float8 caches (no CPU ==) and NaN-free fp32 compare exactly."""
    return t.cpu().view(torch.uint8)


def _quant_caches(num_blocks, block_size, heads, head_size, kv_dtype, device="cpu"):
    shape = (num_blocks, block_size, heads, head_size)
    kc = torch.full(shape, 5, dtype=torch.int8).view(torch.uint8).view(kv_dtype)
    vc = torch.full(shape, -5, dtype=torch.int8).view(torch.uint8).view(kv_dtype)
    ks = torch.full(shape[:3], SENTINEL)
    vs = torch.full(shape[:3], -SENTINEL)
    return [t.to(device) for t in (kc, vc, ks, vs)]


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_size", [(1, 64), (2, 80), (8, 128), (3, 7)])
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
@pytest.mark.parametrize("strided", [False, True])
def test_reshape_and_cache_quantized(
    device, kv_dtype, dtype, heads, head_size, num_tokens, strided
):
    # The write rule is exact (same fp32 operations as the reference): bit-equal caches and scales.
    g = torch.Generator().manual_seed(num_tokens * 7 + heads)
    num_blocks, block_size = 5, 16
    qkv = (torch.randn(num_tokens, 3, heads, head_size, generator=g) * 3).to(dtype)
    if strided:  # token rows inside a fused qkv buffer
        key, value = qkv[:, 1], qkv[:, 2]
    else:
        key, value = qkv[:, 1].contiguous(), qkv[:, 2].contiguous()
    if num_tokens:
        key[0, 0] = 0.0  # an all-zero row: scale 0, values 0
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[1::4] = -1
    kc, vc, ks, vs = _quant_caches(num_blocks, block_size, heads, head_size, kv_dtype)
    want = ref.reshape_and_cache_quantized(key, value, kc, vc, ks, vs, slots)
    kc, vc, ks, vs = (t.to(device) for t in (kc, vc, ks, vs))
    cache.reshape_and_cache(
        key.to(device), value.to(device), kc, vc, slots.to(device), k_scales=ks, v_scales=vs
    )
    for got, expected in zip((kc, vc, ks, vs), want, strict=True):
        assert torch.equal(_bits(got), _bits(expected))
    if num_tokens and slots[0] >= 0:
        row = (slots[0] // block_size, slots[0] % block_size, 0)
        assert ks.cpu()[row] == 0 and (_bits(kc)[row] == 0).all()


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
def test_quantized_write_rule_by_hand(device, kv_dtype):
    # Values chosen so the rule's rounding shows, independent of the reference: scale = 1 when
    # max|x| = QMAX, ties round to even (int8: 2.5 -> 2, 3.5 -> 4, -0.5 -> 0; e4m3 near 1 has a
    # step of 1/8, so 1.0625 -> 1.0, 1.1875 -> 1.25).
    qmax = 127.0 if kv_dtype == torch.int8 else 448.0
    if kv_dtype == torch.int8:
        row, want = [qmax, 2.5, 3.5, -0.5, -qmax, 0.0, 1.0, 126.6], [127, 2, 4, 0, -127, 0, 1, 127]
    else:
        row, want = [qmax, 1.0625, 1.1875, -2.0, -qmax, 0.0, 1e-3, 300.0], None
    key = torch.tensor(row).view(1, 1, 8)
    kc, vc, ks, vs = _quant_caches(1, 4, 1, 8, kv_dtype, device)
    cache.reshape_and_cache(
        key.to(device),
        (key * 0).to(device),
        kc,
        vc,
        torch.tensor([2], device=device),
        k_scales=ks,
        v_scales=vs,
    )
    assert ks.cpu()[0, 2, 0] == 1.0 and vs.cpu()[0, 2, 0] == 0.0
    assert (_bits(vc)[0, 2] == 0).all()
    stored = kc.cpu()[0, 2, 0].float()
    if want is None:  # e4m3: the subnormal step is 2^-9, 300 lies between 288 and 320
        want = [448.0, 1.0, 1.25, -2.0, -448.0, 0.0, 2.0**-9, 288.0]
    assert stored.tolist() == [float(w) for w in want]
    assert ks.cpu()[0, 1, 0] == SENTINEL  # neighbours untouched


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_write_subnormal_rows(device, kv_dtype, dtype):
    # A row whose max|x| is below FLT_MIN (subnormal, whatever its signs) stores s = 0, q = 0 on
    # every device, flush-to-zero or not. A row whose max is FLT_MIN itself is quantized: its
    # subnormal s divides exactly, so its subnormal elements keep nonzero values.
    tiny = torch.finfo(torch.float32).tiny
    qmax = 127.0 if kv_dtype == torch.int8 else 448.0
    key = torch.tensor(
        [
            [1e-39, -3e-39, 0.0, 5e-40, -1e-45, 0.0, 2e-39, 0.0],
            [tiny, tiny / 2, 1e-40, -tiny, 0.0, 0.0, -tiny / 4, 0.0],
        ]
    ).to(dtype)
    key = key.view(2, 1, 8)
    value = torch.flip(key, dims=[0])
    kc, vc, ks, vs = _quant_caches(1, 4, 1, 8, kv_dtype)
    want = ref.reshape_and_cache_quantized(key, value, kc, vc, ks, vs, torch.tensor([0, 3]))
    kc, vc, ks, vs = (t.to(device) for t in (kc, vc, ks, vs))
    cache.reshape_and_cache(
        key.to(device),
        value.to(device),
        kc,
        vc,
        torch.tensor([0, 3], device=device),
        k_scales=ks,
        v_scales=vs,
    )
    for got, expected in zip((kc, vc, ks, vs), want, strict=True):
        assert torch.equal(_bits(got), _bits(expected))
    kc, vc, ks, vs = (t.cpu() for t in (kc, vc, ks, vs))
    # The subnormal row: key at slot 0, value at slot 3.
    assert ks[0, 0, 0] == 0 and vs[0, 3, 0] == 0
    assert (_bits(kc)[0, 0] == 0).all() and (_bits(vc)[0, 3] == 0).all()
    # The FLT_MIN row: value at slot 0, key at slot 3.
    for q, s in ((kc[0, 3, 0], ks[0, 3, 0]), (vc[0, 0, 0], vs[0, 0, 0])):
        assert 0 < s < tiny
        stored = q.float()
        assert stored[0] == qmax and stored[3] == -qmax
        assert stored[1] == (64.0 if kv_dtype == torch.int8 else 224.0)  # (tiny / 2) / s
        assert stored[2] != 0 and stored[6] != 0


@pytest.mark.parametrize("kv_dtype", KV_QUANT)
def test_quantized_write_error_bound(device, kv_dtype):
    # Dequantized rows are within half a step of the input: s / 2 for int8; for e4m3 2^-4 of the
    # value (3 mantissa bits) or half the subnormal step s * 2^-10, whichever is larger.
    g = torch.Generator().manual_seed(3)
    key = torch.randn(64, 4, 128, generator=g) * torch.logspace(-3, 3, 64).view(64, 1, 1)
    kc, vc, ks, vs = _quant_caches(4, 16, 4, 128, kv_dtype, device)
    slots = torch.arange(64, device=device)
    cache.reshape_and_cache(key.to(device), key.to(device), kc, vc, slots, k_scales=ks, v_scales=vs)
    s = ks.cpu().view(64, 4, 1)
    err = (ref.dequantize_kv(kc.cpu(), ks.cpu()).view(64, 4, 128) - key).abs()
    if kv_dtype == torch.int8:
        bound = s / 2 * (1 + 1e-6)
    else:
        bound = torch.maximum(key.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)
    assert (err <= bound).all()


def _write_args(device, kv_dtype=torch.int8):
    kc, vc, ks, vs = _quant_caches(3, 16, 2, 64, kv_dtype, device)
    key = torch.randn(4, 2, 64, device=device)
    slots = torch.tensor([0, 1, 2, 3], device=device)
    return dict(
        key=key,
        value=key.clone(),
        key_cache=kc,
        value_cache=vc,
        slot_mapping=slots,
        k_scales=ks,
        v_scales=vs,
    )


QUANT_WRITE_BAD = [
    (dict(k_scales=None), "k_scales and v_scales are required; got no k_scales and v_scales"),
    (dict(v_scales=None), "k_scales and v_scales are required; got k_scales and no v_scales"),
    (
        dict(key_cache=torch.zeros(3, 16, 2, 64), value_cache=torch.zeros(3, 16, 2, 64)),
        "k_scales/v_scales are only taken with an int8 or float8_e4m3fn cache",
    ),
    (dict(k_scales=torch.zeros(3, 16, 2, dtype=torch.half)), "k_scales has dtype Half"),
    (dict(v_scales=torch.zeros(3, 16, 1)), r"v_scales has shape \[3, 16, 1\]; expected"),
    (dict(k_scales=torch.zeros(16, 3, 2).transpose(0, 1)), "k_scales must be contiguous"),
    (
        dict(value_cache=torch.zeros(3, 16, 2, 64, dtype=torch.float8_e4m3fn)),
        "value_cache has dtype Float8_e4m3fn but key_cache has dtype Char",
    ),
    (
        dict(
            key=torch.zeros(4, 2, 64, dtype=torch.float64),
            value=torch.zeros(4, 2, 64, dtype=torch.float64),
        ),
        "needs float32, float16 or bfloat16 keys",
    ),
]


@pytest.mark.parametrize(("change", "match"), QUANT_WRITE_BAD)
def test_reshape_and_cache_quantized_bad_inputs(device, change, match):
    args = _write_args(device)
    args.update({k: v.to(device) if v is not None else None for k, v in change.items()})
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sagellm.reshape_and_cache(**args)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float32])
def test_copy_and_swap_blocks_quantized_and_scales(device, dtype):
    # Block copies move bytes: int8 / e4m3 caches and their fp32 scale tensors copy exactly.
    g = torch.Generator().manual_seed(5)
    if dtype == torch.float32:  # scales [num_blocks, block_size, kv_heads]
        shape = (6, 16, 2)
        layers = [torch.randn(shape, generator=g) for _ in range(4)]
    else:  # any byte pattern, NaN encodings included: only bits move
        shape = (6, 16, 2, 64)
        layers = [
            torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).view(dtype)
            for _ in range(4)
        ]
    layers = [t.to(device) for t in layers]
    mapping = torch.tensor([[0, 3], [5, 1], [3, 4]])
    want = [_bits(t).clone() for t in layers]
    for w in want:
        for s, d in mapping.tolist():
            w[d] = w[s]
    cache.copy_blocks(layers[:2], layers[2:], mapping)
    for got, w in zip(layers, want, strict=True):
        assert torch.equal(_bits(got), w)
    dst = torch.zeros(2, *shape[1:], dtype=dtype).to(device)
    cache.swap_blocks(layers[0], dst, torch.tensor([[4, 1], [0, 0]]))
    assert torch.equal(_bits(dst)[1], _bits(layers[0])[4])
    assert torch.equal(_bits(dst)[0], _bits(layers[0])[0])


def test_opcheck_quantized(device):
    args = _write_args(device)
    args["slot_mapping"] = torch.tensor([0, -1, 5, 40], device=device)
    torch.library.opcheck(torch.ops.sagellm.reshape_and_cache.default, (), args)
