"""ModelConfig from transformers' config dicts (5.x spelling) and hand-written 4.x dicts."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from sagellm.models import ModelConfig, UnsupportedModelError, resolve_dtype

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _hf(config, cls_name: str) -> dict:
    d = config.to_dict()
    d["architectures"] = [cls_name]
    return d


def test_llama():
    c = ModelConfig.from_hf_dict(
        _hf(tf.LlamaConfig(**SMALL, rope_theta=5e5, tie_word_embeddings=True), "LlamaForCausalLM")
    )
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_size) == (
        "llama",
        4,
        4,
        2,
        16,
    )
    assert c.rope_theta == 5e5 and c.rope_scaling is None and c.tie_word_embeddings
    assert (
        c.hidden_act == "silu"
        and not c.attention_bias
        and not c.qk_norm
        and c.sliding_window is None
    )
    assert c.layer_types == ("full_attention",) * 4 and c.torch_dtype == "float32"


def test_llama3_rope_scaling_kept():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    c = ModelConfig.from_hf_dict(
        _hf(tf.LlamaConfig(**SMALL, rope_parameters=rope), "LlamaForCausalLM")
    )
    assert (
        c.rope_theta == 5e5
        and c.rope_scaling["rope_type"] == "llama3"
        and c.rope_scaling["factor"] == 8.0
    )


def test_qwen2_has_qkv_bias_only():
    c = ModelConfig.from_hf_dict(_hf(tf.Qwen2Config(**SMALL), "Qwen2ForCausalLM"))
    assert c.architecture == "qwen2" and c.attention_bias and not c.attention_out_bias


def test_qwen3_head_dim_and_qk_norm():
    c = ModelConfig.from_hf_dict(_hf(tf.Qwen3Config(**SMALL, head_dim=32), "Qwen3ForCausalLM"))
    assert c.architecture == "qwen3" and c.head_size == 32 and c.qk_norm and not c.attention_bias


def test_mistral_sliding_window():
    c = ModelConfig.from_hf_dict(
        _hf(tf.MistralConfig(**SMALL, sliding_window=16), "MistralForCausalLM")
    )
    assert c.sliding_window == 16 and c.layer_types == ("sliding_attention",) * 4
    c = ModelConfig.from_hf_dict(
        _hf(tf.MistralConfig(**SMALL, sliding_window=None), "MistralForCausalLM")
    )
    assert c.sliding_window is None and c.layer_types == ("full_attention",) * 4


def test_gemma3():
    cfg = tf.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 7},
        head_dim=32,
        sliding_window=8,
        query_pre_attn_scalar=24,
        final_logit_softcapping=30.0,
    )
    c = ModelConfig.from_hf_dict(_hf(cfg, "Gemma3ForCausalLM"))
    assert c.architecture == "gemma3" and c.head_size == 32 and c.qk_norm and c.tie_word_embeddings
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (c.rope_theta, c.rope_local_theta, c.sliding_window) == (1e6, 1e4, 8)
    assert c.query_pre_attn_scalar == 24 and c.final_logit_softcapping == 30.0
    assert c.attn_logit_softcapping is None and c.hidden_act == "gelu_pytorch_tanh"


def test_gemma3_4x_spelling():
    d = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **SMALL,
        "num_hidden_layers": 12,
        "sliding_window": 32,
        "sliding_window_pattern": 6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"type": "linear", "factor": 8.0},
        "hidden_activation": "gelu_pytorch_tanh",
        "torch_dtype": "bfloat16",
        "eos_token_id": [1, 106],
    }
    c = ModelConfig.from_hf_dict(d)
    assert (
        c.layer_types[5] == c.layer_types[11] == "full_attention"
        and c.layer_types[0] == "sliding_attention"
    )
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0} and c.rope_local_theta == 1e4
    assert c.torch_dtype == "bfloat16" and c.eos_token_ids == {1, 106}


def test_gpt2():
    cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256)
    c = ModelConfig.from_hf_dict(_hf(cfg, "GPT2LMHeadModel"))
    assert (c.architecture, c.hidden_size, c.intermediate_size, c.num_layers) == (
        "gpt2",
        64,
        256,
        3,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_size, c.max_position) == (4, 4, 16, 256)
    assert c.rope_theta is None and c.hidden_act == "gelu_new" and c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings and c.attention_bias and c.mlp_bias


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (
            {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **SMALL},
            "MixtralForCausalLM",
        ),
        ({"model_type": "bert", **SMALL}, "bert"),
        (
            {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
            "Gemma3ForConditionalGeneration",
        ),
        (
            {"architectures": ["LlamaForCausalLM"], **SMALL, "num_key_value_heads": 3},
            "num_kv_heads = 3",
        ),
        ({"architectures": ["LlamaForCausalLM"], **SMALL, "hidden_size": 0}, "hidden_size = 0"),
        ({"architectures": ["LlamaForCausalLM"], "vocab_size": 8}, "hidden_size"),
    ],
)
def test_unsupported(d, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf_dict(d)


def test_remote_code_is_named_not_run():
    d = {
        "architectures": ["FancyForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "x.Fancy"},
        **SMALL,
    }
    with pytest.raises(UnsupportedModelError, match="FancyForCausalLM.*not executed"):
        ModelConfig.from_hf_dict(d)


def test_resolve_dtype():
    c = ModelConfig.from_hf_dict(
        {**_hf(tf.LlamaConfig(**SMALL), "LlamaForCausalLM"), "dtype": "bfloat16"}
    )
    assert resolve_dtype("auto", c) == torch.bfloat16
    assert (
        resolve_dtype("fp16", c) == torch.float16 and resolve_dtype("float32", c) == torch.float32
    )
    assert resolve_dtype(torch.bfloat16, c) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype = 'int8'"):
        resolve_dtype("int8", c)
