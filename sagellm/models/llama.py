"""The Llama family: Llama 2/3, Mistral (sliding window), Qwen2 (qkv bias), Qwen3 (q/k norm)."""

from __future__ import annotations

import torch
from torch import nn

from sagellm.models.base import CausalLM
from sagellm.models.config import ModelConfig
from sagellm.models.layers.activation import gated_activation
from sagellm.models.layers.attention import AttentionMetadata, PagedAttention
from sagellm.models.layers.direct_call import DirectCall
from sagellm.models.layers.linear import Embedding, Linear
from sagellm.models.layers.norm import RMSNorm
from sagellm.models.layers.rotary import RotaryEmbedding


def layer_window(cfg: ModelConfig, i: int) -> int | None:
    """The sliding window of layer i, or None for full attention."""
    if cfg.sliding_window and cfg.layer_types[i] == "sliding_attention":
        return cfg.sliding_window
    return None


def rotary_for(cfg: ModelConfig, device) -> RotaryEmbedding:
    """One rotary table for every layer (the cos/sin cache is 2 MB per 8k positions)."""
    d = cfg.head_size
    rot_dim = int(d * (cfg.partial_rotary_factor or 1.0))
    return RotaryEmbedding(
        d, rot_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling, device=device
    )


class LlamaAttention(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device, rotary: RotaryEmbedding):
        super().__init__()
        h, kh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.sizes = [h * d, kh * d, kh * d]
        self.head_size = d
        qkv_bias, o_bias = cfg.attention_bias, cfg.attention_out_bias
        kw = dict(dtype=dtype, device=device)
        self.qkv_proj = Linear(
            cfg.hidden_size,
            shards=[("q", h * d), ("k", kh * d), ("v", kh * d)],
            bias=qkv_bias,
            name=f"layers.{i}.qkv_proj",
            **kw,
        )
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=o_bias, name=f"layers.{i}.o_proj", **kw)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.rotary = rotary
        self.attn = PagedAttention(h, kh, d, d**-0.5, sliding_window=layer_window(cfg, i))

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split_with_sizes(self.sizes, dim=-1)
        if self.qk_norm:
            d = self.head_size
            q = self.q_norm(q.reshape(-1, d)).view(-1, self.sizes[0])
            k = self.k_norm(k.reshape(-1, d)).view(-1, self.sizes[1])
        self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class GatedMLP(DirectCall, nn.Module):
    def __init__(self, hidden: int, inter: int, act: str, bias: bool, i: int, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = Linear(
            hidden,
            shards=[("gate", inter), ("up", inter)],
            bias=bias,
            name=f"layers.{i}.gate_up_proj",
            **kw,
        )
        self.down_proj = Linear(inter, hidden, bias=bias, name=f"layers.{i}.down_proj", **kw)
        self.act = gated_activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device, rotary: RotaryEmbedding):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = LlamaAttention(cfg, i, dtype, device, rotary)
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, i, dtype, device
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def forward(self, positions, x, residual, kv_cache, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.forward_add(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm.forward_add(x, residual)
        return self.mlp(x), residual


class LlamaModel(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.embed_tokens = Embedding(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device, name="embed_tokens"
        )
        rotary = rotary_for(cfg, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, dtype, device, rotary) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, cache, meta)
        x, _ = self.norm.forward_add(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    fused_names = [
        (r"\.self_attn\.q_proj\.", ".self_attn.qkv_proj.", "q"),
        (r"\.self_attn\.k_proj\.", ".self_attn.qkv_proj.", "k"),
        (r"\.self_attn\.v_proj\.", ".self_attn.qkv_proj.", "v"),
        (r"\.mlp\.gate_proj\.", ".mlp.gate_up_proj.", "gate"),
        (r"\.mlp\.up_proj\.", ".mlp.gate_up_proj.", "up"),
    ]

    model_cls: type[nn.Module] = LlamaModel  # the decoder stack; Gemma 3 swaps in its own

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device="cpu"):
        super().__init__(config, dtype, device)
        self.model = self.model_cls(config, dtype, device)
        if not self.tied_embeddings():
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, dtype=dtype, device=device, name="lm_head"
            )

    def forward(self, input_ids, positions, kv_caches, meta):
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tied_embeddings():
            logits = self.model.embed_tokens.unembed(hidden).float()
        else:
            logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
