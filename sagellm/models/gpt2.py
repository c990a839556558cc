"""GPT-2: learned positions, LayerNorm with bias, GELU (tanh) MLP, fused qkv stored as Conv1D."""

from __future__ import annotations

import torch
from torch import nn

from sagellm.models.base import CausalLM
from sagellm.models.config import ModelConfig
from sagellm.models.layers.activation import activation
from sagellm.models.layers.attention import PagedAttention
from sagellm.models.layers.linear import Embedding, Linear
from sagellm.models.layers.norm import LayerNorm


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device):
        super().__init__()
        e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_size
        kw = dict(dtype=dtype, device=device)
        self.ln_1 = LayerNorm(e, cfg.rms_norm_eps, **kw)
        self.ln_2 = LayerNorm(e, cfg.rms_norm_eps, **kw)
        self.attn = nn.Module()
        self.attn.c_attn = Linear(e, 3 * h * d, bias=True, name=f"h.{i}.attn.c_attn", **kw)
        self.attn.c_proj = Linear(h * d, e, bias=True, name=f"h.{i}.attn.c_proj", **kw)
        self.attn.paged = PagedAttention(h, h, d, d**-0.5)
        self.mlp = nn.Module()
        self.mlp.c_fc = Linear(e, cfg.intermediate_size, bias=True, name=f"h.{i}.mlp.c_fc", **kw)
        self.mlp.c_proj = Linear(
            cfg.intermediate_size, e, bias=True, name=f"h.{i}.mlp.c_proj", **kw
        )
        self.act = activation(cfg.hidden_act)
        self.width = h * d

    def forward(self, x, kv_cache, meta):
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(self.width, dim=-1)
        x = x + self.attn.c_proj(self.attn.paged(q, k, v, kv_cache, meta))
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class GPT2LMHeadModel(CausalLM):
    transposed_names = [r"\.c_attn\.weight$", r"\.c_proj\.weight$", r"\.c_fc\.weight$"]

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device="cpu"):
        super().__init__(config, dtype, device)
        e = config.hidden_size
        kw = dict(dtype=dtype, device=device)
        self.transformer = nn.Module()
        self.transformer.wte = Embedding(config.vocab_size, e, name="wte", **kw)
        self.transformer.wpe = Embedding(config.max_position, e, name="wpe", **kw)
        self.transformer.h = nn.ModuleList(
            GPT2Block(config, i, dtype, device) for i in range(config.num_layers)
        )
        self.transformer.ln_f = LayerNorm(e, config.rms_norm_eps, **kw)
        self.requires_grad_(False)
        if not self.tied_embeddings():
            self.lm_head = Linear(e, config.vocab_size, name="lm_head", **kw)

    def tied_embeddings(self) -> bool:
        return self.config.tie_word_embeddings is not False

    def forward(self, input_ids, positions, kv_caches, meta):
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block, cache in zip(t.h, kv_caches):
            x = block(x, cache, meta)
        return t.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tied_embeddings():
            return self.transformer.wte.unembed(hidden).float()
        return self.lm_head(hidden).float()
