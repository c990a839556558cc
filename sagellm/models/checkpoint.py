"""`load_checkpoint`: resolve a model, then read its config, weights and tokenizer."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sagellm.models.config import ModelConfig
from sagellm.models.errors import CorruptCheckpointError
from sagellm.models.resolve import resolve_model
from sagellm.models.tokenizer import Tokenizer

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


@dataclass
class LoadedCheckpoint:
    """A model ready to be built: weights under transformers' parameter names.

    `weights` holds only what the checkpoint stores: with tied embeddings there is no
    "lm_head.weight" (use "model.embed_tokens.weight"). `tokenizer` is None when a folder ships
    no tokenizer files. `gguf_tensor_types`: transformers name -> stored type ("Q4_1", "F32"...).
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    source: str
    format: Literal["safetensors", "bin", "gguf"]
    dtype: torch.dtype
    gguf_tensor_types: dict[str, str] | None = None
    load_seconds: dict[str, float] = field(default_factory=dict)


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """ "auto" -> the checkpoint's dtype (fp32 if it names none); else the named dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype = {dtype} is not one of float32, float16, bfloat16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return _DTYPES[config.torch_dtype]
    if key not in _DTYPES:
        raise ValueError(f"dtype = {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


def load_checkpoint(
    model: str | Path | None = None,
    dtype: str | torch.dtype | Callable[[ModelConfig, str], torch.dtype] = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    load_tokenizer: bool = True,
) -> LoadedCheckpoint:
    """Load `model` (a folder, a .gguf file, or an "org/name" id; None: the default model).

    Raises ModelNotFoundError, UnsupportedModelError, CorruptCheckpointError (all ModelLoadError),
    or ValueError for a bad `dtype`. `dtype` may also be a callable (config, format) -> dtype, for
    callers whose choice depends on the checkpoint (the engine's "auto"). `progress` shows a bar on stderr when it is a terminal.
    """
    if model is None:
        from sagellm.models.default_model import default_model_path

        model = default_model_path()
    resolved = resolve_model(str(model), revision)
    show = progress and sys.stderr.isatty()
    if resolved.kind == "gguf":
        return _load_gguf(resolved.path, dtype, show, load_tokenizer)
    return _load_hf(resolved.path, dtype, show, load_tokenizer, trust_remote_code)


def _load_gguf(path: Path, dtype, progress: bool, load_tokenizer: bool) -> LoadedCheckpoint:
    from sagellm.models.gguf_loader import GGUFFile, gguf_config_dict, load_gguf_weights

    t0 = time.perf_counter()
    f = GGUFFile(path)
    config = ModelConfig.from_hf_dict(gguf_config_dict(f))
    torch_dtype = dtype(config, "gguf") if callable(dtype) else resolve_dtype(dtype, config)
    t1 = time.perf_counter()
    weights, types = load_gguf_weights(f, config, torch_dtype, progress)
    t2 = time.perf_counter()
    tokenizer = None
    if load_tokenizer:
        extra = set(config.eos_token_ids)
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if isinstance(f.metadata.get(key), int):
                extra.add(f.metadata[key])
        tokenizer = Tokenizer.from_gguf(path, config.hf_config["model_type"], extra)
    t3 = time.perf_counter()
    return LoadedCheckpoint(
        config,
        weights,
        tokenizer,
        str(path),
        "gguf",
        torch_dtype,
        types,
        {"header": t1 - t0, "weights": t2 - t1, "tokenizer": t3 - t2},
    )


def _load_hf(path: Path, dtype, progress: bool, load_tokenizer: bool, trust_remote_code: bool):
    from tqdm import tqdm

    from sagellm.models.safetensors_loader import count_tensors, iter_weights, weight_files

    t0 = time.perf_counter()
    config = ModelConfig.from_hf_dict(_read_json(path / "config.json"))
    fmt, files = weight_files(path)
    torch_dtype = dtype(config, fmt) if callable(dtype) else resolve_dtype(dtype, config)
    t1 = time.perf_counter()
    bar = tqdm(
        total=count_tensors(fmt, files) if progress else None,
        desc="Loading weights",
        unit="tensor",
        disable=not progress,
    )
    weights = {}
    with bar:
        for name, tensor in iter_weights(fmt, files, torch_dtype):
            weights[name] = tensor
            bar.update()
    t2 = time.perf_counter()
    tokenizer = None
    if load_tokenizer:
        extra = set(config.eos_token_ids)
        gen = path / "generation_config.json"
        if gen.is_file():
            eos = _read_json(gen).get("eos_token_id")
            extra |= {eos} if isinstance(eos, int) else set(eos or ())
        tokenizer = Tokenizer.from_folder(path, extra, trust_remote_code)
    t3 = time.perf_counter()
    return LoadedCheckpoint(
        config,
        weights,
        tokenizer,
        str(path),
        fmt,
        torch_dtype,
        None,
        {"header": t1 - t0, "weights": t2 - t1, "tokenizer": t3 - t2},
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(data).__name__}, not a JSON object")
    return data
