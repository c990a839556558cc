"""GGUF loading: equality with transformers' own GGUF loader, conventions undone, bad files."""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch

from sagellm.models import (
    CorruptCheckpointError,
    ModelConfig,
    UnsupportedModelError,
    load_checkpoint,
)
from sagellm.models.gguf_loader import GGUFFile, dequantize_raw, gguf_config_dict, iter_gguf_raw
from tests.models.conftest import write_tiny_gguf


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_path):
    return load_checkpoint(str(smollm2_path), dtype="float32", progress=False, load_tokenizer=False)


def test_smollm2_equals_transformers(smollm2_fp32, smollm2_hf_state):
    ours, ref = smollm2_fp32.weights, smollm2_hf_state
    # tied embeddings: the file has no output.weight, transformers' lm_head is the embedding
    assert "lm_head.weight" not in ours and smollm2_fp32.config.tie_word_embeddings
    assert set(ref) - set(ours) == {"lm_head.weight"}
    assert torch.equal(ref["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, ref[name]), name


def test_smollm2_config_and_types(smollm2_fp32):
    c = smollm2_fp32.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (c.head_size, c.vocab_size, c.intermediate_size, c.max_position) == (
        64,
        49152,
        1536,
        8192,
    )
    assert c.rope_theta == 100000.0 and c.rope_scaling is None and c.eos_token_id == 2
    types = smollm2_fp32.gguf_tensor_types
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.norm.weight"] == "F32"
    assert smollm2_fp32.format == "gguf" and smollm2_fp32.load_seconds["weights"] < 15


def test_smollm2_bf16_is_fp32_rounded(smollm2_path, smollm2_fp32):
    bf16 = load_checkpoint(str(smollm2_path), dtype="bf16", progress=False, load_tokenizer=False)
    for name, tensor in bf16.weights.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, smollm2_fp32.weights[name].to(torch.bfloat16)), name


def test_raw_blocks_dequantize_to_the_weights(smollm2_path, smollm2_fp32):
    f = GGUFFile(smollm2_path)
    raws = {t.name: t for t in iter_gguf_raw(f, smollm2_fp32.config)}
    q = raws["model.layers.3.self_attn.q_proj.weight"]
    assert q.ggml_type == gguf.GGMLQuantizationType.Q4_1 and q.data.dtype == np.uint8
    assert q.shape == (576, 576) and q.data.shape == (576, 576 // 32 * 20)
    for name in (
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.weight",
        "model.layers.3.input_layernorm.weight",
    ):
        assert torch.equal(dequantize_raw(raws[name], torch.float32), smollm2_fp32.weights[name])


def test_header_parser_matches_gguf_reader(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen3", Qwen3ForCausalLM(cfg), quant=gguf.GGMLQuantizationType.Q8_0)
    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.ggml_type == b.tensor_type and a.shape == tuple(reversed(b.shape.tolist()))
        assert np.array_equal(
            ours.tensor_data(a).reshape(-1).view(np.uint8), b.data.reshape(-1).view(np.uint8)
        )
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_llama_cpp_conventions_undone(tmp_path, arch):
    """A model written the way llama.cpp converts it (Q/K permuted, gemma norms + 1) loads back equal."""
    import transformers as tf

    small = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    cfg, klass = {
        "llama": (tf.LlamaConfig(**small), tf.LlamaForCausalLM),
        "qwen3": (tf.Qwen3Config(**small), tf.Qwen3ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig(**small, sliding_window=8), tf.Gemma3ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = klass(cfg)
    with torch.no_grad():  # norms are initialised to exactly 0 or 1; make them distinguishable
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch, model)
    ck = load_checkpoint(str(path), dtype="float32", progress=False, load_tokenizer=False)
    state = model.state_dict()
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(ck.weights) == set(state) - tied
    for name, tensor in ck.weights.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SAGELLM_SLOW_MODEL_TESTS"),
    reason="~50 s on 2 cores; set SAGELLM_SLOW_MODEL_TESTS=1",
)
def test_gemma3_equals_transformers(gemma3_path):
    from transformers import AutoModelForCausalLM

    ck = load_checkpoint(str(gemma3_path), dtype="float32", progress=False, load_tokenizer=False)
    c = ck.config
    assert (
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_size,
    ) == ("gemma3", 18, 640, 4, 1, 256)
    assert (
        c.sliding_window == 512
        and c.layer_types[5] == "full_attention"
        and c.layer_types[0] == "sliding_attention"
    )
    assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert c.hidden_act == "gelu_pytorch_tanh" and c.qk_norm and c.tie_word_embeddings
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(gemma3_path.parent), gguf_file=gemma3_path.name, dtype=torch.float32
    )
    assert list(ref_model.config.layer_types) == list(c.layer_types)
    ref = ref_model.state_dict()
    assert set(ref) - set(ck.weights) == {"lm_head.weight"}
    for name, tensor in ck.weights.items():
        assert torch.equal(tensor, ref[name]), name


def test_truncated_gguf_is_corrupt(tmp_path, smollm2_path):
    size = smollm2_path.stat().st_size
    for n, what in ((size * 3 // 5, "truncated"), (4096, "header")):
        bad = tmp_path / f"cut{n}.gguf"
        with open(smollm2_path, "rb") as src, open(bad, "wb") as dst:
            dst.write(src.read(n))
        with pytest.raises(CorruptCheckpointError, match=str(bad.name)) as info:
            load_checkpoint(str(bad), progress=False)
        assert what in str(info.value) or "truncated" in str(info.value)


def test_not_a_gguf_is_corrupt(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CorruptCheckpointError, match="model.gguf.*not a GGUF"):
        load_checkpoint(str(bad), progress=False)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (
        ("block_count", 1),
        ("embedding_length", 32),
        ("feed_forward_length", 32),
        ("context_length", 64),
        ("attention.head_count", 2),
    ):
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor(
        "token_embd.weight", np.zeros((8, 40), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="token_embed|embed_tokens.*Q8_1"):
        load_checkpoint(str(path), progress=False, load_tokenizer=False)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="mamba"):
        ModelConfig.from_hf_dict(gguf_config_dict(GGUFFile(path)))


def test_copy_of_default_model_loads_from_folder(tmp_path, smollm2_path):
    """A folder holding exactly one .gguf resolves to it."""
    shutil.copy(smollm2_path, tmp_path / smollm2_path.name)
    ck = load_checkpoint(str(tmp_path), progress=False, load_tokenizer=False)
    assert ck.source == str((tmp_path / smollm2_path.name).resolve()) and ck.config.num_layers == 30
