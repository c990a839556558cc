"""`load_checkpoint`: resolve a model, then read its config, weights and tokenizer."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sagellm.models.config import ModelConfig
from sagellm.models.errors import CorruptCheckpointError
from sagellm.models.gguf_loader import GGUFWeight
from sagellm.models.resolve import resolve_model
from sagellm.models.tokenizer import Tokenizer

log = logging.getLogger("sagellm.models")

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
    A GGUF weight kept in its block format is a GGUFWeight, not a tensor (see `quantized`).
    `weight_kernels`: stored type -> (what multiplies with it, number of tensors), e.g.
    {"Q4_1": ("gguf_linear Q4_1 x int8 (avx512-vnni)", 210), "F32": ("dense float32", 61)}.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor | GGUFWeight]
    tokenizer: Tokenizer | None
    source: str
    format: Literal["safetensors", "bin", "gguf"]
    dtype: torch.dtype
    gguf_tensor_types: dict[str, str] | None = None
    load_seconds: dict[str, float] = field(default_factory=dict)
    weight_kernels: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """Whether some weights are kept in their GGUF block format."""
        return any(isinstance(w, GGUFWeight) for w in self.weights.values())

    def describe_kernels(self) -> str:
        """One line: "Q4_1: gguf_linear Q4_1 x int8 (avx512-vnni) x 210 tensors; F32: ..."."""
        most_first = sorted(self.weight_kernels.items(), key=lambda kv: -kv[1][1])
        return "; ".join(
            f"{t}: {kernel} x {n} tensor{'s' if n != 1 else ''}" for t, (kernel, n) in most_first
        )


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
    quantized_on: torch.device | str | None = None,
) -> LoadedCheckpoint:
    """Load `model` (a folder, a .gguf file, or an "org/name" id; None: the default model).

    Raises ModelNotFoundError, UnsupportedModelError, CorruptCheckpointError (all ModelLoadError),
    or ValueError for a bad `dtype`. `dtype` may also be a callable (config, format) -> dtype, for
    callers whose choice depends on the checkpoint (the engine's "auto"). `progress` shows a bar
    on stderr when it is a terminal.

    `quantized_on`: the device the model will run on, to keep a GGUF file's block-quantized 2-d
    weights as stored wherever gguf_linear has a kernel for their type there (they come back as
    GGUFWeight; `dtype` is then the activations' dtype). Other tensors (norms, biases, F32/F16,
    types without a kernel) are dequantized to `dtype`. None: everything is dequantized.
    """
    if model is None:
        from sagellm.models.default_model import default_model_path

        model = default_model_path()
    resolved = resolve_model(str(model), revision)
    show = progress and sys.stderr.isatty()
    if resolved.kind == "gguf":
        return _load_gguf(resolved.path, dtype, show, load_tokenizer, quantized_on)
    return _load_hf(resolved.path, dtype, show, load_tokenizer, trust_remote_code)


def _load_gguf(
    path: Path, dtype, progress: bool, load_tokenizer: bool, quantized_on
) -> LoadedCheckpoint:
    from sagellm.models.gguf_loader import GGUFFile, gguf_config_dict, load_gguf_weights
    from sagellm.models.layers.linear import gguf_native_types

    t0 = time.perf_counter()
    f = GGUFFile(path)
    config = ModelConfig.from_hf_dict(gguf_config_dict(f))
    torch_dtype = dtype(config, "gguf") if callable(dtype) else resolve_dtype(dtype, config)
    keep = gguf_native_types(quantized_on) if quantized_on is not None else frozenset()
    if keep and torch_dtype not in (torch.float32, torch.bfloat16):
        keep = frozenset()  # gguf_linear takes fp32 or bf16 activations only
    t1 = time.perf_counter()
    weights, types = load_gguf_weights(f, config, torch_dtype, progress, keep_types=keep)
    t2 = time.perf_counter()
    tokenizer = None
    if load_tokenizer:
        extra = set(config.eos_token_ids)
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if isinstance(f.metadata.get(key), int):
                extra.add(f.metadata[key])
        tokenizer = Tokenizer.from_gguf(path, config.hf_config["model_type"], extra)
    t3 = time.perf_counter()
    ckpt = LoadedCheckpoint(
        config,
        weights,
        tokenizer,
        str(path),
        "gguf",
        torch_dtype,
        types,
        {"header": t1 - t0, "weights": t2 - t1, "tokenizer": t3 - t2},
        _weight_kernels(weights, types, torch_dtype, quantized_on),
    )
    log.info("%s weights: %s", path.name, ckpt.describe_kernels())
    return ckpt


def _weight_kernels(weights, types, dtype, device) -> dict[str, tuple[str, int]]:
    from sagellm.ops import quant as quant_ops

    out: dict[str, tuple[str, int]] = {}
    for name, w in weights.items():
        if isinstance(w, GGUFWeight):
            dev = torch.device(device)
            kernel = (
                f"gguf_linear {quant_ops.gguf_kernel(w.qtype)}"
                if dev.type == "cpu"
                else f"gguf_linear ({dev.type})"
            )
        else:
            kernel = f"dense {str(dtype).removeprefix('torch.')}"
            if types[name] not in ("F32", "F16", "BF16"):
                kernel += " (dequantized at load)"
        prev = out.get(types[name], (kernel, 0))
        out[types[name]] = (kernel if prev[0] == kernel else f"{prev[0]} / {kernel}", prev[1] + 1)
    return out


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
