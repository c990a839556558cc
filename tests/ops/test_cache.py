"""reshape_and_cache, copy_blocks and swap_blocks against the pure-torch reference (exact)."""

from __future__ import annotations

import pytest
import torch

from sagellm.ops import cache
from sagellm.ops.reference import cache as ref
from tests.ops.tolerances import DTYPES

SENTINEL = 7.0  # caches start full of it, so an untouched slot is recognisable


def _caches(num_blocks, block_size, heads, head_size, dtype):
    shape = (num_blocks, block_size, heads, head_size)
    return torch.full(shape, SENTINEL, dtype=dtype), torch.full(shape, -SENTINEL, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,head_size", [(1, 64), (2, 80), (8, 128), (3, 7)])
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
def test_reshape_and_cache(dtype, block_size, heads, head_size, num_tokens):
    g = torch.Generator().manual_seed(num_tokens + heads)
    num_blocks = 6
    key = torch.randn(num_tokens, heads, head_size, generator=g).to(dtype)
    value = torch.randn(num_tokens, heads, head_size, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::5] = -1  # padding tokens
    kc, vc = _caches(num_blocks, block_size, heads, head_size, dtype)
    ek, ev = ref.reshape_and_cache(key, value, kc, vc, slots)
    cache.reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert (kc.view(-1, heads, head_size)[~written] == SENTINEL).all()


@pytest.mark.parametrize("three_d_slices", [False, True])
def test_reshape_and_cache_from_qkv_slices(three_d_slices):
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
    cache.reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


def test_reshape_and_cache_bad_inputs():
    key = torch.randn(3, 2, 16)
    kc, vc = _caches(2, 16, 2, 16, torch.float32)
    slots = torch.tensor([0, 1, 2])
    op = cache.reshape_and_cache
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 32 is out of range \[0, 32\)"):
        op(key, key, kc, vc, torch.tensor([0, 32, 1]))
    with pytest.raises(RuntimeError, match=r"slot_mapping\[2\] = -2"):
        op(key, key, kc, vc, torch.tensor([0, 1, -2]))
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_several_layers(dtype):
    layers, shape = 3, (8, 16, 2, 64)
    kcs = [torch.randn(shape).to(dtype) for _ in range(layers)]
    vcs = [torch.randn(shape).to(dtype) for _ in range(layers)]
    # (1 -> 5) then (5 -> 6): pairs apply in order, so block 6 receives block 1.
    mapping = torch.tensor([[1, 5], [2, 0], [5, 6], [3, 3]])
    ek, ev = ref.copy_blocks(kcs, vcs, mapping)
    cache.copy_blocks(kcs, vcs, mapping)
    for got, want in zip(kcs + vcs, ek + ev, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(kcs[0][6], kcs[0][1])


def test_copy_blocks_empty():
    kc = torch.randn(4, 16, 1, 8)
    before = kc.clone()
    cache.copy_blocks([kc], [kc.clone()], torch.zeros(0, 2, dtype=torch.int64))
    cache.copy_blocks([], [], torch.zeros(0, 2, dtype=torch.int64))
    assert torch.equal(kc, before)


def test_copy_blocks_bad_inputs():
    kcs = [torch.zeros(4, 16, 1, 8) for _ in range(2)]
    vcs = [torch.zeros(4, 16, 1, 8) for _ in range(2)]
    ok = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match=r"block_mapping\[1, 1\] = 4 is out of range \[0, 4\)"):
        cache.copy_blocks(kcs, vcs, torch.tensor([[0, 1], [2, 4]]))
    with pytest.raises(RuntimeError, match=r"block_mapping\[0, 0\] = -1"):
        cache.copy_blocks(kcs, vcs, torch.tensor([[-1, 1]]))
    with pytest.raises(RuntimeError, match="block_mapping"):
        cache.copy_blocks(kcs, vcs, ok.int())
    with pytest.raises(RuntimeError, match="block_mapping"):
        cache.copy_blocks(kcs, vcs, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="value_caches"):
        cache.copy_blocks(kcs, vcs[:1], ok)
    with pytest.raises(RuntimeError, match=r"value_caches\[1\]"):
        cache.copy_blocks(kcs, [vcs[0], torch.zeros(5, 16, 1, 8)], ok)
    with pytest.raises(RuntimeError, match=r"key_caches\[1\]"):
        cache.copy_blocks([kcs[0], kcs[1].half()], vcs, ok)
    with pytest.raises(RuntimeError, match=r"key_caches\[0\]"):
        cache.copy_blocks([kcs[0].transpose(1, 2), kcs[1]], vcs, ok)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_blocks_between_caches_of_different_sizes(dtype):
    src = torch.randn(10, 16, 2, 32).to(dtype)
    dst = torch.full((6, 16, 2, 32), SENTINEL, dtype=dtype)
    mapping = torch.tensor([[9, 0], [3, 5], [0, 2]])
    expected = ref.swap_blocks(src, dst, mapping)
    cache.swap_blocks(src, dst, mapping)
    assert torch.equal(dst, expected)
    assert (dst[[1, 3, 4]] == SENTINEL).all()
    back = torch.zeros_like(src)
    cache.swap_blocks(dst, back, torch.tensor([[0, 9], [5, 3]]))
    assert torch.equal(back[9], src[9]) and torch.equal(back[3], src[3])


def test_swap_blocks_within_one_tensor_in_order():
    t = torch.arange(4.0).view(4, 1).repeat(1, 8)
    cache.swap_blocks(t, t, torch.tensor([[0, 1], [1, 2]]))
    assert torch.equal(t[:, 0], torch.tensor([0.0, 0.0, 0.0, 3.0]))


def test_swap_blocks_bad_inputs():
    src, dst = torch.zeros(10, 16, 8), torch.zeros(6, 16, 8)
    with pytest.raises(RuntimeError, match=r"block_mapping\[0, 0\] = 10 is out of range \[0, 10\)"):
        cache.swap_blocks(src, dst, torch.tensor([[10, 0]]))
    with pytest.raises(RuntimeError, match=r"block_mapping\[1, 1\] = 6 is out of range \[0, 6\)"):
        cache.swap_blocks(src, dst, torch.tensor([[0, 0], [1, 6]]))
    with pytest.raises(RuntimeError, match="block_mapping"):
        cache.swap_blocks(src, dst, torch.tensor([[0, 0]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="dst"):
        cache.swap_blocks(src, torch.zeros(6, 16, 4), torch.tensor([[0, 0]]))
    with pytest.raises(RuntimeError, match="dst"):
        cache.swap_blocks(src, dst.half(), torch.tensor([[0, 0]]))
    with pytest.raises(RuntimeError, match="src"):
        cache.swap_blocks(src.transpose(1, 2), dst.transpose(1, 2), torch.tensor([[0, 0]]))


def test_opcheck():
    key = torch.randn(3, 2, 16)
    kc, vc = _caches(2, 16, 2, 16, torch.float32)
    torch.library.opcheck(
        torch.ops.sagellm.reshape_and_cache.default,
        (key, key.clone(), kc, vc, torch.tensor([0, -1, 5])),
    )
    kcs = [torch.randn(4, 16, 1, 8) for _ in range(2)]
    vcs = [torch.randn(4, 16, 1, 8) for _ in range(2)]
    torch.library.opcheck(torch.ops.sagellm.copy_blocks.default, (kcs, vcs, torch.tensor([[0, 1]])))
    torch.library.opcheck(
        torch.ops.sagellm.swap_blocks.default,
        (torch.randn(5, 16, 8), torch.zeros(3, 16, 8), torch.tensor([[4, 0], [1, 2]])),
    )


def test_traces_under_torch_compile():
    def write(key, kc, vc, slots):
        cache.reshape_and_cache(key, key * 2, kc, vc, slots)
        return kc.sum() + vc.sum()

    key = torch.randn(3, 2, 16)
    slots = torch.tensor([0, -1, 5])
    kc, vc = _caches(2, 16, 2, 16, torch.float32)
    ke, ve = kc.clone(), vc.clone()
    expected = write(key, ke, ve, slots)
    got = torch.compile(write, fullgraph=True, backend="aot_eager")(key, kc, vc, slots)
    torch.testing.assert_close(got, expected)
    assert torch.equal(kc, ke) and torch.equal(vc, ve)
