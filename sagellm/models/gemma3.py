"""Gemma 3 (text): interleaved sliding-window and global layers, q/k norm, MQA, head size 256,
scaled embeddings, GeGLU, four norms per layer, norm weights stored as offsets from 1."""

from __future__ import annotations

import torch
from torch import nn

from sagellm.models.config import ModelConfig
from sagellm.models.layers.attention import PagedAttention
from sagellm.models.layers.direct_call import DirectCall
from sagellm.models.layers.norm import RMSNorm
from sagellm.models.layers.rotary import RotaryEmbedding
from sagellm.models.llama import (
    GatedMLP,
    LlamaForCausalLM,
    attention_projections,
    local_heads,
    row_parallel_call,
    token_embedding,
)


def is_sliding(cfg: ModelConfig, i: int) -> bool:
    return cfg.layer_types[i] == "sliding_attention"


def rotaries_for(cfg: ModelConfig, device) -> dict[bool, RotaryEmbedding]:
    """The two rotary tables (sliding layers: local base, no scaling), shared by all layers: the
    cos/sin cache is 32 MB per table at 32k positions and head size 256."""
    d = cfg.head_size
    local = RotaryEmbedding(
        d, d, cfg.max_position, cfg.rope_local_theta or 10000.0, None, device=device
    )
    full = RotaryEmbedding(d, d, cfg.max_position, cfg.rope_theta, cfg.rope_scaling, device=device)
    return {True: local, False: full}


class Gemma3Attention(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device, rotary: RotaryEmbedding, tp=None):
        super().__init__()
        heads = local_heads(cfg, tp)
        h, kh, d = heads.num_heads, heads.num_kv_heads, cfg.head_size
        kw = dict(dtype=dtype, device=device)
        self.sizes, self.head_size = [h * d, kh * d, kh * d], d
        self.qkv_proj, self.o_proj = attention_projections(cfg, i, heads, tp, dtype, device)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, offset=1.0, **kw)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, offset=1.0, **kw)
        sliding = is_sliding(cfg, i)
        self.rotary = rotary
        self.attn = PagedAttention(
            h,
            kh,
            d,
            (cfg.query_pre_attn_scalar or d) ** -0.5,
            sliding_window=cfg.sliding_window if sliding else None,
            soft_cap=cfg.attn_logit_softcapping,
        )

    def forward(self, positions, x, kv_cache, meta):
        q, k, v = self.qkv_proj(x).split_with_sizes(self.sizes, dim=-1)
        d = self.head_size
        q = self.q_norm(q.reshape(-1, d)).view(-1, self.sizes[0])
        k = self.k_norm(k.reshape(-1, d)).view(-1, self.sizes[1])
        self.rotary(positions, q, k)
        return row_parallel_call(self.o_proj, self.attn(q, k, v, kv_cache, meta))


class Gemma3DecoderLayer(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device, rotary: RotaryEmbedding, tp=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device, offset=1.0)
        self.self_attn = Gemma3Attention(cfg, i, dtype, device, rotary, tp)
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, False, i, dtype, device, tp
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def forward(self, positions, x, kv_cache, meta):
        h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3Model(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, tp=None):
        super().__init__()
        self.embed_tokens = token_embedding(cfg, tp, dtype, device)
        # HF multiplies by sqrt(hidden) rounded to the model dtype.
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=dtype).item()
        rotary = rotaries_for(cfg, device)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, i, dtype, device, rotary[is_sliding(cfg, i)], tp)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device, offset=1.0
        )

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.embed_tokens(input_ids) * self.embed_scale
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(positions, x, cache, meta)
        return self.norm(x)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Same fused checkpoint names, LM head and (optional) final logit soft-cap as Llama; only the
    decoder stack differs."""

    model_cls = Gemma3Model
