"""Hugging Face checkpoints written by transformers load back with the same names and values."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from sagellm.models import CorruptCheckpointError, ModelNotFoundError, load_checkpoint

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL, tie_word_embeddings=True),
    "qwen2": lambda: tf.Qwen2Config(**SMALL),
    "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=16),
    "mistral": lambda: tf.MistralConfig(**SMALL, sliding_window=16),
    "gemma3": lambda: tf.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8),
    "gpt2": lambda: tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def _save(tmp_path, arch, **kwargs):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    model.save_pretrained(tmp_path, **kwargs)
    return model.state_dict()


def _assert_same(weights, state, tied):
    assert set(state) - set(weights) <= {"lm_head.weight"} if tied else set(state) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_safetensors_round_trip(tmp_path, arch):
    state = _save(tmp_path, arch)
    ck = load_checkpoint(str(tmp_path), dtype="float32", progress=False)
    assert ck.format == "safetensors" and ck.config.architecture == arch and ck.tokenizer is None
    _assert_same(ck.weights, state, ck.config.tie_word_embeddings)


def test_sharded_safetensors(tmp_path):
    state = _save(tmp_path, "qwen2", max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ck = load_checkpoint(str(tmp_path), dtype="float32", progress=False)
    _assert_same(ck.weights, state, tied=False)


def test_bin_fallback_and_dtypes(tmp_path):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    model.config.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ck = load_checkpoint(str(tmp_path), dtype="float32", progress=False)
    assert ck.format == "bin"
    _assert_same(ck.weights, state, tied=True)
    bf16 = load_checkpoint(str(tmp_path), dtype="bf16", progress=False)
    assert all(t.dtype == torch.bfloat16 for t in bf16.weights.values())
    assert torch.equal(bf16.weights["model.norm.weight"], state["model.norm.weight"].bfloat16())


def test_auto_dtype_is_the_checkpoint_dtype(tmp_path):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["qwen3"]()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ck = load_checkpoint(str(tmp_path), progress=False)
    assert ck.dtype == torch.bfloat16 and ck.config.torch_dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in ck.weights.values())
    with pytest.raises(ValueError, match="dtype = 'int4'"):
        load_checkpoint(str(tmp_path), dtype="int4", progress=False)


def test_truncated_safetensors(tmp_path):
    _save(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    for cut in (len(data) // 2, 40):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
            load_checkpoint(str(tmp_path), progress=False)


def test_truncated_bin(tmp_path):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="pytorch_model.bin"):
        load_checkpoint(str(tmp_path), progress=False)


def test_missing_shard(tmp_path):
    _save(tmp_path, "qwen2", max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CorruptCheckpointError, match=victim):
        load_checkpoint(str(tmp_path), progress=False)


def test_config_without_weights(tmp_path):
    CONFIGS["llama"]().save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_checkpoint(str(tmp_path), progress=False)
