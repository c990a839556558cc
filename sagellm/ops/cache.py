"""Paged KV-cache writes and block copies: typed wrappers over torch.ops.sagellm, fake kernels.

Per layer the caches are [num_blocks, block_size, num_kv_heads, head_size] ("NHD"); slot s is
block s // block_size, offset s % block_size.
"""

from __future__ import annotations

import torch

import sagellm  # noqa: F401  (loads the extension that registers torch.ops.sagellm)
from sagellm.ops.attention import QUANT_KV_DTYPES


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    """Write token t's key/value rows into cache slot slot_mapping[t] (in place; -1 skips).

    key, value: [num_tokens, num_kv_heads, head_size], the caches' dtype (or, for a quantized
        cache, fp32/fp16/bf16); token rows may be strided (e.g. slices of a fused qkv buffer),
        head_size contiguous.
    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], contiguous.
    slot_mapping: int64 [num_tokens], each -1 or in [0, num_blocks * block_size).
    k_scales, v_scales: fp32 [num_blocks, block_size, num_kv_heads], required iff the caches are
        int8 or float8_e4m3fn. Each (token, head) row x is stored as q = x / s with
        s = max|x| / QMAX (127 for int8, rounded half to even; 448 for e4m3, rounded to nearest
        even), and s written to the scales; an all-zero row stores q = 0, s = 0.
    """
    torch.ops.sagellm.reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping, k_scales, v_scales
    )


def copy_blocks(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """For each (src, dst) row of block_mapping, in order, copy block src to dst in every cache.

    key_caches, value_caches: one cache per layer, all [num_blocks, ...] of one shape and dtype,
        contiguous (bytes are copied, so int8 / float8 caches and fp32 scale tensors work alike:
        pass the scales as another "layer" list call).
    block_mapping: int64 [n, 2] on the CPU, ids in [0, num_blocks).
    """
    torch.ops.sagellm.copy_blocks(key_caches, value_caches, block_mapping)


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """dst[d] = src[s] for each (s, d) row of block_mapping (in place).

    src, dst: one cache each, [num_blocks, ...] with the same block shape and dtype (num_blocks
        may differ), contiguous.
    block_mapping: int64 [n, 2] on the CPU; s in [0, src blocks), d in [0, dst blocks).
    """
    torch.ops.sagellm.swap_blocks(src, dst, block_mapping)


@torch.library.register_fake("sagellm::reshape_and_cache")
def _reshape_and_cache_fake(
    key, value, key_cache, value_cache, slot_mapping, k_scales=None, v_scales=None
) -> None:
    torch._check(
        value.shape == key.shape,
        lambda: f"value has shape {tuple(value.shape)} but key has {tuple(key.shape)}",
    )
    torch._check(
        slot_mapping.shape[0] == key.shape[0],
        lambda: f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens",
    )
    quantized = key_cache.dtype in QUANT_KV_DTYPES
    torch._check(
        quantized == (k_scales is not None) and quantized == (v_scales is not None),
        lambda: (
            f"k_scales/v_scales must be given iff the cache is quantized "
            f"(key_cache dtype {key_cache.dtype})"
        ),
    )


@torch.library.register_fake("sagellm::copy_blocks")
def _copy_blocks_fake(key_caches, value_caches, block_mapping) -> None:
    torch._check(
        len(key_caches) == len(value_caches),
        lambda: f"{len(key_caches)} key_caches but {len(value_caches)} value_caches",
    )


@torch.library.register_fake("sagellm::swap_blocks")
def _swap_blocks_fake(src, dst, block_mapping) -> None:
    torch._check(
        src.shape[1:] == dst.shape[1:],
        lambda: f"src block shape {tuple(src.shape[1:])} != dst {tuple(dst.shape[1:])}",
    )
