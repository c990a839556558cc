"""Random-weight checkpoints in the shapes of published models, for benchmarks.

A benchmark of `--shape qwen2.5-0.5b` needs no download: the shape's transformers config is built
here, the weights are drawn by transformers' own initialiser (fixed seed) and written with
`save_pretrained` into a cache folder, beside a copy of the default model's tokenizer, so the
folder loads like any Hugging Face checkpoint in sageLLM, transformers and the tests. Speed
depends only on the shape, not on the values, so random weights measure what the real ones would.

The tokenizer's vocabulary (49152 tokens) can be smaller than the shape's: benchmark prompts are
random token ids below both, and the embedding rows above it are still read by the lm_head.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# What marks a finished folder: written last, after the weights and the tokenizer.
_MARKER = "sagellm_shape.json"
# Class names, not classes: importing transformers at module import costs seconds.
_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


@dataclass(frozen=True)
class Shape:
    """The numbers that fix a decoder's cost; `model_type` is a transformers model type."""

    name: str
    model_type: str  # "llama" or "qwen2"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    max_position: int

    def __post_init__(self) -> None:
        if self.model_type not in _CONFIG_CLASSES:
            raise ValueError(
                f"model_type = {self.model_type!r} is invalid: expected one of "
                f"{', '.join(_CONFIG_CLASSES)}"
            )
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} = {getattr(self, field)} is invalid: expected >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size}, num_heads {self.num_heads}, num_kv_heads "
                f"{self.num_kv_heads}: heads must divide hidden_size and kv heads must divide heads"
            )

    def num_parameters(self) -> int:
        """Parameter count, the tied embedding counted once (norm weights included)."""
        h, kv = self.hidden_size, self.num_kv_heads * (self.hidden_size // self.num_heads)
        attn = h * h * 2 + h * kv * 2 + (h + 2 * kv if self.model_type == "qwen2" else 0)
        mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + embed + h


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("qwen2.5-0.5b", "qwen2", 24, 896, 14, 2, 4864, 151936, True, 1_000_000.0, 32768),
        Shape("llama3-8b", "llama", 32, 4096, 32, 8, 14336, 128256, False, 500_000.0, 8192),
        Shape("smollm2-135m", "llama", 30, 576, 9, 3, 1536, 49152, True, 100_000.0, 8192),
    )
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"shape = {name!r} is unknown: expected one of {', '.join(SHAPES)}")
    return SHAPES[name]


def transformers_config(shape: Shape, bos: int | None = None, eos: int | None = None):
    """The transformers config of `shape` (special token ids from the tokenizer it ships with)."""
    import transformers

    klass = getattr(transformers, _CONFIG_CLASSES[shape.model_type])
    return klass(
        num_hidden_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_position,
        rms_norm_eps=1e-6 if shape.model_type == "qwen2" else 1e-5,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sagellm" / "shapes"


def _default_tokenizer():
    """The default model's Hugging Face tokenizer, rebuilt from its GGUF metadata."""
    from sagellm.models.default_model import default_model_path
    from sagellm.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_model_path(), "llama").hf


def checkpoint_folder(
    shape: Shape,
    dtype: torch.dtype,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """A folder holding `shape` with random weights in `dtype`, written on first use.

    `device` is where the weights are drawn (a GPU draws an 8B model in seconds; the CPU takes
    minutes). A folder written for a different definition of the same name is rewritten.
    """
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype = {dtype} is invalid: expected float32, bfloat16 or float16")
    folder = Path(root or cache_root()) / f"{shape.name}-{DTYPE_NAMES[dtype]}"
    marker = folder / _MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == asdict(shape):
        return folder

    from transformers import AutoModelForCausalLM

    tokenizer = _default_tokenizer()
    config = transformers_config(shape, tokenizer.bos_token_id, tokenizer.eos_token_id)
    # Written beside the destination, then renamed: a run killed half-way (or a second process
    # writing the same shape) never leaves a folder that looks finished.
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(staging)
    del model
    tokenizer.save_pretrained(staging)
    (staging / _MARKER).write_text(json.dumps(asdict(shape), indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
