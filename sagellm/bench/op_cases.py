"""One case builder per op: inputs on the chosen device and dtype, the calls to time, the work.

A builder returns the sageLLM kernel call, the pure-torch reference call (sagellm.ops.reference),
for attention a torch SDPA call on the same K/V laid out contiguously (what a user would
otherwise write), and the bytes the op must move and the FLOPs it must do:
  * attention: the K and V rows of each sequence's context read once, q read, out written, plus
    the metadata it reads (used block-table entries, seq_lens, query_start_loc); FLOPs are
    4 * num_heads * head_size per attended (query, key) pair (q.k and p.v, 2 FLOPs per MAC);
  * elementwise ops: every byte read and written once (index tensors included); no FLOP figure,
    since they are memory-bound and any count would be a convention, not a measure.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

PARAM_FLAGS = {
    "batch": "--batch",
    "context": "--context",
    "heads": "--heads",
    "kv_heads": "--kv-heads",
    "head_size": "--head-size",
    "block_size": "--block-size",
    "tokens": "--tokens",
    "hidden": "--hidden",
}

RMS_EPS = 1e-6
ROPE_BASE = 10000.0


@dataclass(frozen=True)
class CaseConfig:
    """One point of a sweep: an op, a dtype, a device and the shape parameters the op reads."""

    op: str
    dtype: torch.dtype
    device: torch.device
    params: dict[str, int]
    seed: int = 0


@dataclass
class OpCase:
    """What to time for one CaseConfig, and the work one call must do."""

    kernel: Callable[[], object]
    reference: Callable[[], object]
    bytes_moved: int
    flops: int | None = None
    sdpa: Callable[[], object] | None = None
    notes: dict[str, str] = field(default_factory=dict)


class OpUnavailable(RuntimeError):
    """The op's wrapper or reference module cannot be imported in this build."""


def _family(name: str) -> tuple[ModuleType, ModuleType]:
    try:
        kernel = importlib.import_module(f"sagellm.ops.{name}")
        reference = importlib.import_module(f"sagellm.ops.reference.{name}")
    except ImportError as exc:
        raise OpUnavailable(f"sagellm.ops.{name} is not available: {exc}") from exc
    return kernel, reference


def _randn(shape: Sequence[int], cfg: CaseConfig, gen: torch.Generator) -> torch.Tensor:
    # Drawn in fp32 on the CPU from a seeded generator, so every dtype and device sees the same
    # values for the same seed.
    return torch.randn(*shape, generator=gen).to(device=cfg.device, dtype=cfg.dtype)


def _int32(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32).to(device)


@dataclass
class _PagedKV:
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    blocks_per_seq: int

    def contiguous_kv(self, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V gathered through the block tables: [num_seqs, num_kv_heads, context, d]."""

        def gather(cache: torch.Tensor) -> torch.Tensor:
            num_seqs = self.block_tables.shape[0]
            rows = cache[self.block_tables.long()]  # [seqs, blocks, block_size, kv_heads, d]
            rows = rows.reshape(num_seqs, -1, *cache.shape[2:])[:, :context]
            return rows.transpose(1, 2).contiguous()

        return gather(self.key_cache), gather(self.value_cache)


def _paged_kv(cfg: CaseConfig, gen: torch.Generator) -> _PagedKV:
    p = cfg.params
    blocks_per_seq = math.ceil(p["context"] / p["block_size"])
    num_blocks = p["batch"] * blocks_per_seq
    cache_shape = (num_blocks, p["block_size"], p["kv_heads"], p["head_size"])
    # A random permutation scatters each sequence's blocks over the pool, as after a while of
    # serving; contiguous block ids would flatter the kernel's prefetching.
    perm = torch.randperm(num_blocks, generator=gen)
    return _PagedKV(
        key_cache=_randn(cache_shape, cfg, gen),
        value_cache=_randn(cache_shape, cfg, gen),
        block_tables=_int32(perm.view(p["batch"], blocks_per_seq), cfg.device),
        seq_lens=_int32([p["context"]] * p["batch"], cfg.device),
        blocks_per_seq=blocks_per_seq,
    )


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kwargs
) -> tuple[Callable[[], object], dict[str, str]]:
    """A timed SDPA call over [batch, heads, len, d] tensors; GQA by enable_gqa when torch has it.

    kwargs: is_causal=True, or causal_offset=n for a causal mask aligned to the bottom-right
    corner (the queries are the last q_len of the keys), or nothing."""
    if q.device.type == "cuda":
        return _sdpa_cuda(
            q, k, v, scale, kwargs.get("is_causal", False), kwargs.get("causal_offset")
        )
    offset = kwargs.pop("causal_offset", None)
    if offset is not None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        kwargs["attn_mask"] = mask.tril(offset)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    try:
        F.scaled_dot_product_attention(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1], enable_gqa=True)
    except TypeError:
        # Older torch: expand K/V once at set-up, so only attention itself is timed.
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        gqa = {}
        notes = {"sdpa_gqa": "repeat_interleave"}
    else:
        gqa = {"enable_gqa": True}
        notes = {"sdpa_gqa": "enable_gqa"}
    call = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, **gqa, **kwargs)  # noqa: E731
    return call, notes


def _sdpa_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    is_causal: bool,
    causal_offset: int | None,
) -> tuple[Callable[[], object], dict[str, str]]:
    """SDPA on a fused backend, never the math one (which materialises the score matrix and is
    not what anyone would run): FlashAttention first, then memory-efficient, then cuDNN, each
    with native GQA if it takes it, else K/V expanded once at set-up (not timed). A bottom-right
    causal mask goes through torch's lower-right causal bias, which those backends implement
    without a mask tensor. The first combination that runs is timed; notes say which."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    mask: dict = {}
    if causal_offset is not None and causal_offset > 0:
        mask = {"attn_mask": causal_lower_right(q.shape[2], k.shape[2])}
    elif is_causal or causal_offset == 0:
        mask = {"is_causal": True}
    group = q.shape[1] // k.shape[1]
    expanded = None
    failures = []
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
    ):
        for gqa in (True, False) if group > 1 else (False,):
            if not gqa and group > 1 and expanded is None:
                expanded = (
                    k.repeat_interleave(group, dim=1),
                    v.repeat_interleave(group, dim=1),
                )
            kk, vv = (k, v) if gqa or group == 1 else expanded
            extra = {"enable_gqa": True} if gqa else {}

            def call(kk=kk, vv=vv, extra=extra, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, scale=scale, **mask, **extra)

            try:
                call()
            except (RuntimeError, TypeError, ValueError) as exc:
                failures.append(f"{backend.name}{'+gqa' if gqa else ''}: {str(exc)[:80]}")
                continue
            notes = {
                "sdpa_backend": backend.name.lower(),
                "sdpa_gqa": "enable_gqa" if gqa else ("repeat_interleave" if group > 1 else "none"),
            }
            return call, notes
    raise RuntimeError("no fused SDPA backend runs this case: " + "; ".join(failures))


def build_paged_attention_decode(cfg: CaseConfig) -> OpCase:
    attention, reference = _family("attention")
    p = cfg.params
    gen = torch.Generator().manual_seed(cfg.seed)
    kv = _paged_kv(cfg, gen)
    query = _randn((p["batch"], p["heads"], p["head_size"]), cfg, gen)
    out = torch.empty_like(query)
    scale = p["head_size"] ** -0.5
    args = (query, kv.key_cache, kv.value_cache, kv.block_tables, kv.seq_lens, scale)

    k, v = kv.contiguous_kv(p["context"])
    sdpa, notes = _sdpa(query.unsqueeze(2), k, v, scale)

    elem = query.element_size()
    kv_bytes = 2 * p["batch"] * p["context"] * p["kv_heads"] * p["head_size"] * elem
    meta_bytes = 4 * p["batch"] * (kv.blocks_per_seq + 1)
    return OpCase(
        kernel=lambda: attention.paged_attention_decode(*args, out=out),
        reference=lambda: reference.paged_attention_decode(*args),
        sdpa=sdpa,
        bytes_moved=kv_bytes + 2 * query.numel() * elem + meta_bytes,
        flops=4 * p["heads"] * p["head_size"] * p["batch"] * p["context"],
        notes=notes,
    )


def build_paged_attention_prefill(cfg: CaseConfig) -> OpCase:
    attention, reference = _family("attention")
    p = cfg.params
    batch, context, tokens = p["batch"], p["context"], p["tokens"]
    gen = torch.Generator().manual_seed(cfg.seed)
    kv = _paged_kv(cfg, gen)
    query = _randn((batch * tokens, p["heads"], p["head_size"]), cfg, gen)
    out = torch.empty_like(query)
    query_start_loc = _int32([i * tokens for i in range(batch + 1)], cfg.device)
    scale = p["head_size"] ** -0.5
    args = (query, kv.key_cache, kv.value_cache, kv.block_tables, kv.seq_lens, query_start_loc)

    # The new tokens are the last `tokens` of each sequence, so the causal mask is aligned to the
    # bottom-right corner; SDPA's is_causal aligns top-left, which only agrees when tokens == context.
    q = query.view(batch, tokens, p["heads"], p["head_size"]).transpose(1, 2).contiguous()
    k, v = kv.contiguous_kv(context)
    if tokens == context:
        sdpa, notes = _sdpa(q, k, v, scale, is_causal=True)
    else:
        sdpa, notes = _sdpa(q, k, v, scale, causal_offset=context - tokens)

    elem = query.element_size()
    kv_bytes = 2 * batch * context * p["kv_heads"] * p["head_size"] * elem
    meta_bytes = 4 * batch * (kv.blocks_per_seq + 1) + 4 * (batch + 1)
    pairs = batch * (tokens * context - tokens * (tokens - 1) // 2)
    return OpCase(
        kernel=lambda: attention.paged_attention_prefill(*args, scale, out=out),
        reference=lambda: reference.paged_attention_prefill(*args, scale),
        sdpa=sdpa,
        bytes_moved=kv_bytes + 2 * query.numel() * elem + meta_bytes,
        flops=4 * p["heads"] * p["head_size"] * pairs,
        notes=notes,
    )


def build_reshape_and_cache(cfg: CaseConfig) -> OpCase:
    cache, reference = _family("cache")
    p = cfg.params
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = (p["tokens"], p["kv_heads"], p["head_size"])
    key, value = _randn(rows, cfg, gen), _randn(rows, cfg, gen)
    # A pool four times the tokens written, with random slots: writes land scattered, as they do
    # once blocks have been recycled.
    num_blocks = 4 * math.ceil(p["tokens"] / p["block_size"])
    cache_shape = (num_blocks, p["block_size"], p["kv_heads"], p["head_size"])
    key_cache = torch.zeros(cache_shape, dtype=cfg.dtype, device=cfg.device)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(num_blocks * p["block_size"], generator=gen)[: p["tokens"]]
    slot_mapping = slots.to(device=cfg.device, dtype=torch.int64)
    args = (key, value, key_cache, value_cache, slot_mapping)
    # Each row is read from key/value and written into the cache.
    bytes_moved = 2 * 2 * key.numel() * key.element_size() + 8 * p["tokens"]
    return OpCase(
        kernel=lambda: cache.reshape_and_cache(*args),
        reference=lambda: reference.reshape_and_cache(*args),
        bytes_moved=bytes_moved,
    )


def build_rms_norm(cfg: CaseConfig) -> OpCase:
    norm, reference = _family("norm")
    p = cfg.params
    gen = torch.Generator().manual_seed(cfg.seed)
    x = _randn((p["tokens"], p["hidden"]), cfg, gen)
    weight = _randn((p["hidden"],), cfg, gen)
    out = torch.empty_like(x)
    elem = x.element_size()
    return OpCase(
        kernel=lambda: norm.rms_norm(x, weight, RMS_EPS, out=out),
        reference=lambda: reference.rms_norm(x, weight, RMS_EPS),
        bytes_moved=(2 * x.numel() + weight.numel()) * elem,
    )


def build_fused_add_rms_norm(cfg: CaseConfig) -> OpCase:
    norm, reference = _family("norm")
    p = cfg.params
    gen = torch.Generator().manual_seed(cfg.seed)
    x = _randn((p["tokens"], p["hidden"]), cfg, gen)
    residual = _randn((p["tokens"], p["hidden"]), cfg, gen)
    weight = _randn((p["hidden"],), cfg, gen)
    # In place: repeated calls keep the values finite (the norm rescales each row), so the same
    # buffers serve every iteration.
    elem = x.element_size()
    return OpCase(
        kernel=lambda: norm.fused_add_rms_norm(x, residual, weight, RMS_EPS),
        reference=lambda: reference.fused_add_rms_norm(x, residual, weight, RMS_EPS),
        bytes_moved=(4 * x.numel() + weight.numel()) * elem,
    )


def build_rotary_embedding(cfg: CaseConfig) -> OpCase:
    rotary, reference = _family("rotary")
    p = cfg.params
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens, head_size = p["tokens"], p["head_size"]
    query = _randn((tokens, p["heads"] * head_size), cfg, gen)
    key = _randn((tokens, p["kv_heads"] * head_size), cfg, gen)
    positions = torch.arange(tokens, dtype=torch.int64, device=cfg.device)
    # fp32 cos/sin (the wrapper also takes query's dtype): angles of late positions lose too much
    # in bf16.
    cos_sin_cache = rotary.make_cos_sin_cache(head_size, tokens, ROPE_BASE).to(cfg.device)
    args = (positions, query, key, head_size, cos_sin_cache, True)
    # q and k are rotated in place (read + written); each token reads its cos/sin row.
    bytes_moved = (
        2 * (query.numel() + key.numel()) * query.element_size()
        + tokens * cos_sin_cache.shape[1] * cos_sin_cache.element_size()
        + 8 * tokens
    )
    return OpCase(
        kernel=lambda: rotary.rotary_embedding(*args),
        reference=lambda: reference.rotary_embedding(*args),
        bytes_moved=bytes_moved,
        notes={"style": "neox", "rot_dim": str(head_size)},
    )


def _gated_activation(cfg: CaseConfig, name: str) -> OpCase:
    activation, reference = _family("activation")
    p = cfg.params
    gen = torch.Generator().manual_seed(cfg.seed)
    x = _randn((p["tokens"], 2 * p["hidden"]), cfg, gen)
    out = torch.empty(p["tokens"], p["hidden"], dtype=cfg.dtype, device=cfg.device)
    kernel_fn, reference_fn = getattr(activation, name), getattr(reference, name)
    return OpCase(
        kernel=lambda: kernel_fn(x, out=out),
        reference=lambda: reference_fn(x),
        bytes_moved=(x.numel() + out.numel()) * x.element_size(),
    )


def build_silu_and_mul(cfg: CaseConfig) -> OpCase:
    return _gated_activation(cfg, "silu_and_mul")


def build_gelu_and_mul(cfg: CaseConfig) -> OpCase:
    return _gated_activation(cfg, "gelu_and_mul")


@dataclass(frozen=True)
class OpSpec:
    """An op the benchmark knows: its case builder and the shape parameters it reads.

    cuda_defaults override defaults on a GPU: there an op must move far more than the 60 MB of
    L2 to be timed at memory speed, and the attention cases are the issue's targets."""

    build: Callable[[CaseConfig], OpCase]
    defaults: dict[str, int]
    cuda_defaults: dict[str, int] = field(default_factory=dict)


_ATTENTION = {"heads": 32, "kv_heads": 8, "head_size": 128, "block_size": 16}

# Defaults are a Llama-3-8B-like layer; decode's is the reference case of issue 2. Prefill's
# tokens default to its context (a whole prompt), see case_params.
# On CUDA (bf16): the small ops move 128-350 MB; decode reads 0.5 GB of K/V (B=64, C=2048) and
# prefill is a 4k-token prompt.
OPS: dict[str, OpSpec] = {
    "paged_attention_decode": OpSpec(
        build_paged_attention_decode,
        {"batch": 8, "context": 2048, **_ATTENTION},
        {"batch": 64},
    ),
    "paged_attention_prefill": OpSpec(
        build_paged_attention_prefill,
        {"batch": 1, "context": 1024, "tokens": 1024, **_ATTENTION},
        {"context": 4096, "tokens": 4096},
    ),
    "reshape_and_cache": OpSpec(
        build_reshape_and_cache,
        {"tokens": 256, "kv_heads": 8, "head_size": 128, "block_size": 16},
        {"tokens": 65536},
    ),
    "rms_norm": OpSpec(build_rms_norm, {"tokens": 256, "hidden": 4096}, {"tokens": 16384}),
    "fused_add_rms_norm": OpSpec(
        build_fused_add_rms_norm, {"tokens": 256, "hidden": 4096}, {"tokens": 16384}
    ),
    "rotary_embedding": OpSpec(
        build_rotary_embedding,
        {"tokens": 256, "heads": 32, "kv_heads": 8, "head_size": 128},
        {"tokens": 32768},
    ),
    "silu_and_mul": OpSpec(build_silu_and_mul, {"tokens": 256, "hidden": 14336}, {"tokens": 4096}),
    "gelu_and_mul": OpSpec(build_gelu_and_mul, {"tokens": 256, "hidden": 14336}, {"tokens": 4096}),
}


def case_params(
    op: str, given: dict[str, int], device: torch.device | str = "cpu"
) -> dict[str, int]:
    """The op's shape parameters: its defaults (for `device`) overridden by `given` (which may
    hold others)."""
    spec = OPS[op]
    defaults = dict(spec.defaults)
    if torch.device(device).type == "cuda":
        defaults.update(spec.cuda_defaults)
    params = {name: given.get(name, default) for name, default in defaults.items()}
    if op == "paged_attention_prefill" and "tokens" not in given:
        params["tokens"] = params["context"]
    return params


def validate(op: str, params: dict[str, int]) -> None:
    """ValueError naming the flag when a combination of parameters cannot be run."""
    for name, value in params.items():
        if value < 1:
            raise ValueError(f"{op}: {PARAM_FLAGS[name]} {value} must be at least 1")
    if "kv_heads" in params and "heads" in params and params["heads"] % params["kv_heads"]:
        raise ValueError(
            f"{op}: --heads {params['heads']} is not a multiple of --kv-heads {params['kv_heads']}"
        )
    if op == "paged_attention_prefill" and params["tokens"] > params["context"]:
        raise ValueError(
            f"{op}: --tokens {params['tokens']} exceeds --context {params['context']} "
            "(the new tokens are the last ones of each sequence's context)"
        )
    if op == "rotary_embedding" and params["head_size"] % 2:
        raise ValueError(f"{op}: --head-size {params['head_size']} must be even")
