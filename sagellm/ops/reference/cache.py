"""Pure-torch KV-cache references; each returns new caches instead of writing in place."""

from __future__ import annotations

import torch

# Largest stored magnitude per quantized cache dtype (448: e4m3fn's largest finite value).
KV_QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., head_size] -> (q [..., head_size] of `dtype`, fp32 scales [...]).

    The rule of the native op: in fp32, s = max|x| / QMAX and q = x / s, rounded half to even
    (int8, clamped to +-127) or to nearest even (e4m3); a row whose max|x| is below FLT_MIN (all
    zero or subnormal) gives q = 0, s = 0, so no device's denormal handling can change it.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    zero = amax < torch.finfo(torch.float32).tiny
    s = torch.where(zero, torch.zeros_like(amax), amax / KV_QUANT_MAX[dtype])
    q = xf / torch.where(zero, torch.ones_like(s), s).unsqueeze(-1)
    q = q.masked_fill(zero.unsqueeze(-1), 0.0)
    if dtype == torch.int8:
        return torch.round(q).clamp(-127, 127).to(torch.int8), s
    return q.to(dtype), s


def dequantize_kv(cache: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A quantized cache [..., head_size] with scales [...] -> the fp32 values it stands for."""
    return cache.float() * scales.unsqueeze(-1)


def reshape_and_cache_quantized(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reshape_and_cache into an int8 / float8_e4m3fn cache: returns the new (key_cache,
    value_cache, k_scales, v_scales), each token's rows quantized by quantize_kv."""
    kq, ks = quantize_kv(key, key_cache.dtype)
    vq, vs = quantize_kv(value, value_cache.dtype)
    out = [key_cache.clone(), value_cache.clone(), k_scales.clone(), v_scales.clone()]
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot == -1:
            continue
        at = (slot // block_size, slot % block_size)
        for dst, src in zip(out, (kq, vq, ks, vs), strict=True):
            dst[at] = src[t]
    return out[0], out[1], out[2], out[3]


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (key_cache, value_cache) with token t written at slot slot_mapping[t] (-1: skip).

    key, value [num_tokens, num_kv_heads, head_size];
    caches [num_blocks, block_size, num_kv_heads, head_size].
    """
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot == -1:
            continue
        key_cache[slot // block_size, slot % block_size] = key[t]
        value_cache[slot // block_size, slot % block_size] = value[t]
    return key_cache, value_cache


def copy_blocks(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Returns every layer's caches with block src copied to dst for each (src, dst), in order."""
    out_k = [c.clone() for c in key_caches]
    out_v = [c.clone() for c in value_caches]
    for src, dst in block_mapping.tolist():
        for cache in out_k + out_v:
            cache[dst] = cache[src]
    return out_k, out_v


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> torch.Tensor:
    """Returns dst with dst[d] = src[s] for each (s, d) in block_mapping."""
    out = dst.clone()
    for s, d in block_mapping.tolist():
        out[d] = src[s].to(out.device)
    return out
