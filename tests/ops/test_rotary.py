"""rotary_embedding (NeoX and GPT-J, partial rotary) against the pure-torch reference, on every
device present; the reference runs on the same device as the kernel."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from sagellm import ops
from sagellm.ops import rotary
from sagellm.ops.reference import rotary as ref
from tests.ops.tolerances import DTYPES, tol

HAVE_CUDA = torch.cuda.is_available() and ops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and sagellm's CUDA kernels")

MAX_POS = 300
# (head_size, rot_dim): full rotary at every supported head size, partial rotary, and a rot_dim
# whose half is not a multiple of the vector width.
HEADS = [(64, 64), (128, 128), (256, 256), (128, 64), (96, 36)]


def _case(
    num_tokens, heads, kv_heads, head_size, rot_dim, dtype, cache_dtype, seed=0, device="cpu"
):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, MAX_POS, (num_tokens,), generator=g)
    q = torch.randn(num_tokens, heads * head_size, generator=g).to(dtype)
    k = torch.randn(num_tokens, kv_heads * head_size, generator=g).to(dtype)
    cache = rotary.make_cos_sin_cache(rot_dim, MAX_POS, dtype=cache_dtype)
    return positions.to(device), q.to(device), k.to(device), cache.to(device)


@contextlib.contextmanager
def index_checks(device):
    """CUDA ops check index values only on request: turn it on for bad-input tests."""
    if device != "cuda":
        yield
        return
    before = ops.cuda_index_checks()
    ops.set_cuda_index_checks(True)
    try:
        yield
    finally:
        ops.set_cuda_index_checks(before)


def _check(positions, q, k, head_size, cache, is_neox):
    eq, ek = ref.rotary_embedding(positions, q, k, head_size, cache, is_neox)
    rotary.rotary_embedding(positions, q, k, head_size, cache, is_neox)
    torch.testing.assert_close(q, eq, **tol(q.dtype))
    if k is not None:
        torch.testing.assert_close(k, ek, **tol(k.dtype))


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(device, is_neox, head_size, rot_dim, dtype):
    case = _case(7, 4, 2, head_size, rot_dim, dtype, torch.float32, seed=rot_dim, device=device)
    positions, q, k, cache = case
    _check(positions, q, k, head_size, cache, is_neox)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", [(128, 128), (96, 36)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa(cpu_isa, is_neox, head_size, rot_dim, dtype):
    positions, q, k, cache = _case(5, 3, 1, head_size, rot_dim, dtype, torch.float32, seed=1)
    _check(positions, q, k, head_size, cache, is_neox)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rot_dim", [(128, 128), (128, 64), (64, 64), (96, 36)])
@pytest.mark.parametrize("cache_in_query_dtype", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 257, 4099])
def test_cuda_model_sizes(is_neox, head_size, rot_dim, cache_in_query_dtype, dtype, num_tokens):
    # Llama-3-8B's 32 query / 8 KV heads; odd token counts; the cos/sin cache in fp32 or the
    # query's dtype (fp32 query: one and the same).
    cache_dtype = dtype if cache_in_query_dtype else torch.float32
    case = _case(num_tokens, 32, 8, head_size, rot_dim, dtype, cache_dtype, seed=num_tokens,
                 device="cuda")  # fmt: skip
    positions, q, k, cache = case
    _check(positions, q, k, head_size, cache, is_neox)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_cache_in_query_dtype_3d_key_none(device, is_neox, dtype):
    positions, q, _, cache = _case(5, 3, 1, 128, 128, dtype, dtype, seed=3, device=device)
    q = q.view(5, 3, 128)
    eq, ek = ref.rotary_embedding(positions, q, None, 128, cache, is_neox)
    rotary.rotary_embedding(positions, q, None, 128, cache, is_neox)
    assert ek is None
    torch.testing.assert_close(q, eq, **tol(dtype))


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("d,rot", [(64, 32), (128, 128)])
def test_rotary_on_slices_of_qkv(device, is_neox, three_d, d, rot):
    tokens, heads, kv_heads = 6, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(torch.bfloat16).to(device)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    if three_d:
        q, k = q.view(tokens, heads, d), k.view(tokens, kv_heads, d)
    positions = (torch.arange(tokens) * 7).to(device)
    cache = rotary.make_cos_sin_cache(rot, MAX_POS).to(device)
    eq, ek = ref.rotary_embedding(positions, q, k, d, cache, is_neox)
    v_before = v.clone()
    rotary.rotary_embedding(positions, q, k, d, cache, is_neox)
    torch.testing.assert_close(q, eq, **tol(torch.bfloat16))
    torch.testing.assert_close(k, ek, **tol(torch.bfloat16))
    assert torch.equal(v, v_before)
    # Partial rotary: dims past rot_dim pass through bit for bit.
    assert torch.equal(
        q.reshape(tokens, heads, d)[..., rot:], eq.reshape(tokens, heads, d)[..., rot:]
    )


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_unaligned_heads(device, is_neox):
    # Heads 3 elements off a 16-byte boundary: the element-wise path on CUDA.
    tokens, heads, d = 9, 3, 64
    buf = torch.randn(tokens, heads * d + 3).to(torch.float16).to(device)
    q = buf[:, 3:]
    positions = torch.randint(0, MAX_POS, (tokens,)).to(device)
    cache = rotary.make_cos_sin_cache(d, MAX_POS).to(device)
    first = buf[:, :3].clone()
    _check(positions, q, None, d, cache, is_neox)
    assert torch.equal(buf[:, :3], first)


def test_rotary_zero_tokens(device):
    positions, q, k, cache = _case(0, 4, 2, 64, 64, torch.float32, torch.float32, device=device)
    rotary.rotary_embedding(positions, q, k, 64, cache, True)
    assert q.shape == (0, 256)


def test_make_cos_sin_cache():
    cache = rotary.make_cos_sin_cache(8, 5, base=100.0)
    p, i = 3, 2
    angle = p * 100.0 ** (-2 * i / 8)
    assert cache.shape == (5, 8)
    assert math.isclose(cache[p, i].item(), math.cos(angle), rel_tol=1e-6)
    assert math.isclose(cache[p, 4 + i].item(), math.sin(angle), rel_tol=1e-6)
    scaled = rotary.make_cos_sin_cache(8, 5, inv_freq=torch.tensor([1.0, 0.5, 0.25, 0.125]))
    assert math.isclose(scaled[p, i].item(), math.cos(p * 0.25), rel_tol=1e-6)
    with pytest.raises(ValueError, match="inv_freq"):
        rotary.make_cos_sin_cache(8, 5, inv_freq=torch.ones(3))


def test_rotary_bad_inputs(device):
    positions, q, k, cache = _case(3, 2, 1, 64, 64, torch.float32, torch.float32, device=device)
    op = torch.ops.sagellm.rotary_embedding

    def tensor(values):
        return torch.tensor(values, device=device)

    with index_checks(device):
        with pytest.raises(RuntimeError, match=r"positions\[1\] = 300 is out of range \[0, 300\)"):
            op(tensor([0, MAX_POS, 1]), q, k, 64, cache, True)
        with pytest.raises(RuntimeError, match=r"positions\[1\] = -1"):
            op(tensor([0, -1, 1]), q, k, 64, cache, True)
    with pytest.raises(RuntimeError, match="positions"):
        op(positions.int(), q, k, 64, cache, True)
    with pytest.raises(RuntimeError, match="positions"):
        op(positions[:2], q, k, 64, cache, True)
    with pytest.raises(RuntimeError, match="query"):
        op(positions, q.double(), None, 64, cache, True)
    with pytest.raises(RuntimeError, match="query"):
        op(positions, q[:, :100], None, 64, cache, True)
    with pytest.raises(RuntimeError, match="query"):
        op(positions, q.view(3, 2, 64)[:, :, ::2], None, 32, cache[:, :32], True)
    with pytest.raises(RuntimeError, match="key"):
        op(positions, q, k.half(), 64, cache, True)
    with pytest.raises(RuntimeError, match="key"):
        op(positions, q, k[:2], 64, cache, True)
    with pytest.raises(RuntimeError, match="rot_dim"):
        op(positions, q, k, 32, cache, True)  # rot_dim 64 > head_size 32
    with pytest.raises(RuntimeError, match="rot_dim"):
        op(positions, q, k, 64, torch.ones(MAX_POS, 63, device=device), True)
    with pytest.raises(RuntimeError, match="cos_sin_cache"):
        op(positions, q.bfloat16(), k.bfloat16(), 64, cache.half(), True)
    with pytest.raises(RuntimeError, match="head_size"):
        op(positions, q, k, 0, cache, True)


@needs_cuda
@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    positions, q, k, cache = _case(3, 2, 1, 64, 64, torch.float32, torch.float32, device="cuda")
    op = torch.ops.sagellm.rotary_embedding
    with pytest.raises(RuntimeError, match=r"positions is on cpu but query is on cuda"):
        op(positions.cpu(), q, k, 64, cache, True)
    with pytest.raises(RuntimeError, match=r"cos_sin_cache is on cpu but query is on cuda"):
        op(positions, q, k, 64, cache.cpu(), True)
    with pytest.raises(RuntimeError, match=r"key is on cpu but query is on cuda"):
        op(positions, q, k.cpu(), 64, cache, True)


def test_opcheck(device):
    case = _case(3, 2, 1, 64, 64, torch.float32, torch.float32, device=device)
    positions, q, k, cache = case
    op = torch.ops.sagellm.rotary_embedding.default
    torch.library.opcheck(op, (positions, q, k, 64, cache, True))
    torch.library.opcheck(op, (positions, q, None, 64, cache, False))


def test_traces_under_torch_compile(device):
    def rope(positions, q, k, cache):
        rotary.rotary_embedding(positions, q, k, 64, cache, True)
        return q + 1

    case = _case(3, 2, 1, 64, 64, torch.float32, torch.float32, device=device)
    positions, q, k, cache = case
    qe, ke = q.clone(), k.clone()
    expected = rope(positions, qe, ke, cache)
    got = torch.compile(rope, fullgraph=True, backend="aot_eager")(positions, q, k, cache)
    torch.testing.assert_close(got, expected)
    assert torch.equal(k, ke)
