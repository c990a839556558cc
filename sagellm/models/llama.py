"""The Llama family: Llama 2/3, Mistral (sliding window), Qwen2 (qkv bias), Qwen3 (q/k norm)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sagellm.distributed.sharding import HeadSplit, split_heads, split_range
from sagellm.models.base import CausalLM
from sagellm.models.config import ModelConfig
from sagellm.models.layers.activation import gated_activation
from sagellm.models.layers.attention import AttentionMetadata, PagedAttention
from sagellm.models.layers.direct_call import DirectCall
from sagellm.models.layers.linear import Embedding, Linear, VocabParallelEmbedding
from sagellm.models.layers.norm import RMSNorm
from sagellm.models.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from sagellm.distributed.group import TPGroup

# Intermediate (MLP) columns are split between ranks in multiples of this, so the row-parallel
# down projection's column split falls on GGUF block boundaries (256 for K-quants, 32 else).
_MLP_GRANULE = 256


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


def local_heads(cfg: ModelConfig, tp: TPGroup | None) -> HeadSplit:
    """The attention heads this rank holds (all of them without tensor parallelism)."""
    if tp is None or tp.size == 1:
        return HeadSplit(0, cfg.num_heads, 0, cfg.num_kv_heads)
    return split_heads(cfg.num_heads, cfg.num_kv_heads, tp.size, tp.rank)


def attention_projections(
    cfg: ModelConfig, i: int, heads: HeadSplit, tp: TPGroup | None, dtype, device
) -> tuple[Linear, Linear]:
    """qkv_proj (column-parallel: this rank's q heads and the KV heads they read) and o_proj
    (row-parallel: the input columns of those q heads, all-reduced)."""
    d = cfg.head_size
    h, kh = heads.num_heads, heads.num_kv_heads
    kw = dict(dtype=dtype, device=device, tp=tp)
    qkv = Linear(
        cfg.hidden_size,
        shards=[("q", h * d), ("k", kh * d), ("v", kh * d)],
        bias=cfg.attention_bias,
        name=f"layers.{i}.qkv_proj",
        row_slices={
            "q": (heads.q_start * d, h * d),
            "k": (heads.kv_start * d, kh * d),
            "v": (heads.kv_start * d, kh * d),
        },
        **kw,
    )
    if tp is not None and tp.size > 1 and tp.exact:
        widths = [split_heads(cfg.num_heads, cfg.num_kv_heads, tp.size, r) for r in range(tp.size)]
        o = exact_row_parallel(
            cfg.num_heads * d,
            cfg.hidden_size,
            [s.num_heads * d for s in widths],
            tp,
            bias=cfg.attention_out_bias,
            name=f"layers.{i}.o_proj",
            dtype=dtype,
            device=device,
        )
        return qkv, o
    o = Linear(
        h * d,
        cfg.hidden_size,
        bias=cfg.attention_out_bias,
        name=f"layers.{i}.o_proj",
        col_slice=(heads.q_start * d, h * d),
        **kw,
    )
    return qkv, o


def exact_row_parallel(
    k: int, n: int, input_sizes: list[int], tp: TPGroup, *, bias: bool, name: str, dtype, device
) -> Linear:
    """A row-parallel layer computed exactly (see layers.linear): this rank's output rows over
    the whole K, inputs and outputs all-gathered. Call it with `forward_gathered`."""
    sizes = [split_range(n, tp.size, r)[1] for r in range(tp.size)]
    start, size = split_range(n, tp.size, tp.rank)
    return Linear(
        k,
        size,
        bias=bias,
        name=name,
        dtype=dtype,
        device=device,
        tp=tp,
        row_slices={None: (start, size)},
        gather_sizes=sizes,
        input_sizes=input_sizes,
    )


def row_parallel_call(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    return layer.forward_gathered(x) if layer.input_sizes is not None else layer(x)


class LlamaAttention(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device, rotary: RotaryEmbedding, tp=None):
        super().__init__()
        heads = local_heads(cfg, tp)
        h, kh, d = heads.num_heads, heads.num_kv_heads, cfg.head_size
        self.sizes = [h * d, kh * d, kh * d]
        self.head_size = d
        kw = dict(dtype=dtype, device=device)
        self.qkv_proj, self.o_proj = attention_projections(cfg, i, heads, tp, dtype, device)
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
        return row_parallel_call(self.o_proj, self.attn(q, k, v, kv_cache, meta))


def mlp_split(inter: int, tp: TPGroup | None, rank: int | None = None) -> tuple[int, int]:
    """(start, size) of the intermediate columns rank (default: this rank) holds."""
    if tp is None or tp.size == 1:
        return 0, inter
    rank = tp.rank if rank is None else rank
    granule = next(g for g in (_MLP_GRANULE, 32, 1) if inter % g == 0 and inter // g >= tp.size)
    start, size = split_range(inter // granule, tp.size, rank)
    if size == 0:
        raise ValueError(f"intermediate_size = {inter} is too small to split over {tp.size} ranks")
    return start * granule, size * granule


class GatedMLP(DirectCall, nn.Module):
    def __init__(
        self, hidden: int, inter: int, act: str, bias: bool, i: int, dtype, device, tp=None
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device, tp=tp)
        start, size = mlp_split(inter, tp)
        self.gate_up_proj = Linear(
            hidden,
            shards=[("gate", size), ("up", size)],
            bias=bias,
            name=f"layers.{i}.gate_up_proj",
            row_slices={"gate": (start, size), "up": (start, size)},
            **kw,
        )
        if tp is not None and tp.size > 1 and tp.exact:
            widths = [mlp_split(inter, tp, r)[1] for r in range(tp.size)]
            self.down_proj = exact_row_parallel(
                inter,
                hidden,
                widths,
                tp,
                bias=bias,
                name=f"layers.{i}.down_proj",
                dtype=dtype,
                device=device,
            )
        else:
            self.down_proj = Linear(
                size, hidden, bias=bias, name=f"layers.{i}.down_proj", col_slice=(start, size), **kw
            )
        self.act = gated_activation(act)

    def forward(self, x):
        return row_parallel_call(self.down_proj, self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype, device, rotary: RotaryEmbedding, tp=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = LlamaAttention(cfg, i, dtype, device, rotary, tp)
        self.mlp = GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.hidden_act,
            cfg.mlp_bias,
            i,
            dtype,
            device,
            tp,
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


def token_embedding(cfg: ModelConfig, tp: TPGroup | None, dtype, device) -> Embedding:
    """The token table: split by vocabulary rows under tensor parallelism."""
    kw = dict(dtype=dtype, device=device, name="embed_tokens")
    if tp is not None and tp.size > 1:
        return VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=tp, **kw)
    return Embedding(cfg.vocab_size, cfg.hidden_size, **kw)


def lm_head(cfg: ModelConfig, tp: TPGroup | None, dtype, device) -> Linear:
    """An untied LM head: split by vocabulary rows, logits all-gathered, under tensor
    parallelism."""
    if tp is None or tp.size == 1:
        return Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device, name="lm_head")
    sizes = [split_range(cfg.vocab_size, tp.size, r)[1] for r in range(tp.size)]
    start, size = split_range(cfg.vocab_size, tp.size, tp.rank)
    return Linear(
        cfg.hidden_size,
        size,
        dtype=dtype,
        device=device,
        name="lm_head",
        tp=tp,
        row_slices={None: (start, size)},
        gather_sizes=sizes,
    )


class LlamaModel(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, tp=None):
        super().__init__()
        self.embed_tokens = token_embedding(cfg, tp, dtype, device)
        rotary = rotary_for(cfg, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, dtype, device, rotary, tp) for i in range(cfg.num_layers)
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
    supports_tensor_parallel = True

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device="cpu", tp=None):
        super().__init__(config, dtype, device, tp)
        self.model = self.model_cls(config, dtype, device, self.tp)
        if not self.tied_embeddings():
            self.lm_head = lm_head(config, self.tp, dtype, device)

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
