"""`ModelConfig`: the hyper-parameters of every supported architecture under one set of names.

Built from a Hugging Face `config.json` dict (transformers 4.x spelling with `rope_theta` /
`rope_scaling`, and 5.x spelling with `rope_parameters`, are both accepted). GGUF files are turned
into such a dict first (`gguf_loader.gguf_config_dict`), so there is one validation path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sagellm.models.errors import UnsupportedModelError

# `architectures[0]` of a config.json -> our architecture name. Only causal-LM heads: the weight
# names of other heads (classification, vision-language) differ.
ARCHITECTURE_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "GPT2LMHeadModel": "gpt2",
}
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gpt2": "gpt2",
}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt2")
LAYER_TYPES = ("full_attention", "sliding_attention")
_DTYPE_NAMES = {"float32", "float16", "bfloat16"}


@dataclass(frozen=True)
class ModelConfig:
    """Normalised hyper-parameters; `hf_config` keeps the raw dict for anything else."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    max_position: int
    rms_norm_eps: float  # LayerNorm epsilon for gpt2
    rope_theta: float | None  # None for gpt2 (learned positions)
    rope_scaling: dict[str, Any] | None  # HF rope dict with "rope_type"; None for plain rope
    rope_local_theta: float | None  # gemma3: theta of the sliding-window layers
    partial_rotary_factor: float
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections have a bias
    attention_out_bias: bool  # o_proj has a bias (llama attention_bias=True; not qwen2)
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k (qwen3, gemma3)
    hidden_act: str
    sliding_window: int | None  # None when no layer is sliding
    layer_types: tuple[str, ...]  # per layer: "full_attention" | "sliding_attention"
    query_pre_attn_scalar: float | None  # gemma3: attention scale is this ** -0.5
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    torch_dtype: str  # the checkpoint's dtype: "float32" | "float16" | "bfloat16"
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def eos_token_ids(self) -> set[int]:
        if self.eos_token_id is None:
            return set()
        if isinstance(self.eos_token_id, int):
            return {self.eos_token_id}
        return set(self.eos_token_id)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Validate a config.json dict and normalise it; raises UnsupportedModelError."""
        arch = architecture_of(d)
        get = _Getter(d, arch)
        if arch == "gpt2":
            hidden = get.int("n_embd", "hidden_size")
            num_heads = get.int("n_head", "num_attention_heads")
            values = dict(
                vocab_size=get.int("vocab_size"),
                hidden_size=hidden,
                intermediate_size=d.get("n_inner") or 4 * hidden,
                num_layers=get.int("n_layer", "num_hidden_layers"),
                num_heads=num_heads,
                num_kv_heads=num_heads,
                head_size=hidden // num_heads,
                max_position=get.int("n_positions", "max_position_embeddings"),
                rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                rope_theta=None,
                rope_scaling=None,
                rope_local_theta=None,
                partial_rotary_factor=1.0,
                attention_bias=True,
                attention_out_bias=True,
                mlp_bias=True,
                qk_norm=False,
                hidden_act=d.get("activation_function", "gelu_new"),
                layer_types=("full_attention",) * get.int("n_layer", "num_hidden_layers"),
                sliding_window=None,
                tie_default=True,
            )
        else:
            values = _decoder_values(d, arch, get)
        tie = d.get("tie_word_embeddings", values.pop("tie_default"))
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        dtype = str(dtype).removeprefix("torch.")
        config = cls(
            architecture=arch,
            tie_word_embeddings=bool(tie),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if arch == "gemma3" else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=dtype if dtype in _DTYPE_NAMES else "float32",
            hf_config=dict(d),
            **values,
        )
        config._validate()
        return config

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(
                    f"{self.architecture} config: {name} = {value!r} must be > 0"
                )
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{self.architecture} config: num_heads = {self.num_heads} is not a multiple of "
                f"num_kv_heads = {self.num_kv_heads}"
            )
        if self.head_size <= 0:
            raise UnsupportedModelError(f"{self.architecture} config: head_size = {self.head_size}")
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(
                f"{self.architecture} config: layer_types has {len(self.layer_types)} entries for "
                f"num_layers = {self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise UnsupportedModelError(
                f"{self.architecture} config: layer_types {bad} not in {LAYER_TYPES}"
            )
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise UnsupportedModelError(
                f"{self.architecture} config: sliding layers but sliding_window = {self.sliding_window!r}"
            )


def architecture_of(d: dict[str, Any]) -> str:
    """Our architecture name for a config dict, or UnsupportedModelError naming what it has."""
    classes = d.get("architectures") or []
    model_type = d.get("model_type")
    supported = ", ".join(sorted(ARCHITECTURE_CLASSES))
    if classes:
        for name in classes:
            if name in ARCHITECTURE_CLASSES:
                return ARCHITECTURE_CLASSES[name]
        hint = " (its code is not executed: trust_remote_code)" if "auto_map" in d else ""
        raise UnsupportedModelError(
            f"unsupported architecture {classes[0]!r} (model_type {model_type!r}){hint}; "
            f"supported: {supported}"
        )
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise UnsupportedModelError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
    )


class _Getter:
    """Reads required keys with one error format; the first present alias wins."""

    def __init__(self, d: dict[str, Any], arch: str):
        self.d, self.arch = d, arch

    def int(self, *keys: str) -> int:
        for key in keys:
            if self.d.get(key) is not None:
                return int(self.d[key])
        raise UnsupportedModelError(f"{self.arch} config has no {' / '.join(keys)}")


def _rope(d: dict[str, Any], arch: str) -> tuple[float, dict | None, float | None]:
    """(theta, scaling dict or None, local theta) from either the 4.x or the 5.x spelling."""
    params = d.get("rope_parameters")
    local_theta = None
    if isinstance(params, dict) and "full_attention" in params:  # 5.x, per layer type (gemma3)
        local = params.get("sliding_attention") or {}
        local_theta = local.get("rope_theta")
        params = params["full_attention"]
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(d.get("rope_theta", 1_000_000.0 if arch == "gemma3" else 10_000.0))
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else {}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
    if arch == "gemma3" and local_theta is None:
        local_theta = d.get("rope_local_base_freq", 10_000.0)
    if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
        scaling = None
    return theta, scaling, None if local_theta is None else float(local_theta)


def _layer_types(d: dict[str, Any], arch: str, num_layers: int) -> tuple[str, ...]:
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    window = d.get("sliding_window")
    if arch == "gemma3":
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        return tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        )
    if arch == "mistral" and window:
        return ("sliding_attention",) * num_layers
    if arch in ("qwen2", "qwen3") and d.get("use_sliding_window") and window:
        first = d.get("max_window_layers", num_layers)
        return tuple(
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        )
    return ("full_attention",) * num_layers


def _decoder_values(d: dict[str, Any], arch: str, get: _Getter) -> dict[str, Any]:
    hidden = get.int("hidden_size")
    num_heads = get.int("num_attention_heads")
    num_layers = get.int("num_hidden_layers")
    theta, scaling, local_theta = _rope(d, arch)
    layer_types = _layer_types(d, arch, num_layers)
    any_sliding = "sliding_attention" in layer_types
    bias = bool(d.get("attention_bias", False))
    act = d.get("hidden_activation") if arch == "gemma3" else None
    rope_factor = d.get("partial_rotary_factor")
    if rope_factor is None and isinstance(d.get("rope_parameters"), dict):
        rope_factor = d["rope_parameters"].get("partial_rotary_factor")
    return dict(
        vocab_size=get.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=get.int("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_size=int(d.get("head_dim") or hidden // num_heads),
        max_position=get.int("max_position_embeddings"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        partial_rotary_factor=float(rope_factor or 1.0),
        # qwen2 always has q/k/v biases and never an o_proj bias, whatever the config says
        attention_bias=True if arch == "qwen2" else bias,
        attention_out_bias=False if arch == "qwen2" else bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=arch in ("qwen3", "gemma3"),
        hidden_act=act or d.get("hidden_act") or "silu",
        sliding_window=int(d["sliding_window"])
        if any_sliding and d.get("sliding_window")
        else None,
        layer_types=layer_types,
        tie_default=arch == "gemma3",
    )
