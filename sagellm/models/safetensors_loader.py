"""Hugging Face checkpoint weights: *.safetensors (memory-mapped, sharded or not), *.bin fallback.

Names are left exactly as stored, which is what transformers' `state_dict()` uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from sagellm.models.errors import CorruptCheckpointError, ModelNotFoundError

WeightFormat = Literal["safetensors", "bin"]


def weight_files(folder: str | Path) -> tuple[WeightFormat, list[Path]]:
    """The weight files of a checkpoint folder; safetensors preferred over pytorch .bin."""
    folder = Path(folder)
    for fmt, index_name, single, pattern in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            return fmt, _shards_from_index(index)
        if (folder / single).is_file():
            return fmt, [folder / single]
        found = sorted(folder.glob(pattern))
        if found:
            return fmt, found
    raise ModelNotFoundError(
        f"{folder}: no weights (looked for model.safetensors[.index.json], *.safetensors, "
        "pytorch_model.bin[.index.json])"
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{index}: not a valid shard index ({e})") from e
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise CorruptCheckpointError(
            f"{index}: lists shards that are missing: {', '.join(missing)}"
        )
    return shards


def count_tensors(fmt: WeightFormat, files: list[Path]) -> int | None:
    """Tensor count for the progress bar (None for .bin, which would need a full read)."""
    if fmt != "safetensors":
        return None
    from safetensors import safe_open

    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                total += len(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CorruptCheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    return total


def iter_weights(
    fmt: WeightFormat, files: list[Path], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor in `dtype`) for every tensor of every file, one file at a time."""
    for path in files:
        if fmt == "safetensors":
            yield from _safetensors_file(path, dtype)
        else:
            yield from _bin_file(path, dtype)


def _convert(t: torch.Tensor, dtype: torch.dtype, name: str = "") -> torch.Tensor:
    # integer buffers (AWQ / GPTQ packed weights, g_idx) keep their type, and so do the fp16
    # scales of those checkpoints: their weight method widens them to fp32 exactly, where a
    # bf16 model dtype would round them first
    if not t.is_floating_point() or name.endswith(".scales"):
        return t
    return t.to(dtype)


def _safetensors_file(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                yield name, _convert(f.get_tensor(name), dtype, name)
    except (OSError, RuntimeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from e
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise CorruptCheckpointError(
                f"{path}: truncated or corrupt safetensors file ({e})"
            ) from e
        raise


def _bin_file(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        # weights_only: a .bin is a pickle, and a pickle can run code; only tensors are accepted
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle, zip and EOF errors all mean an unusable file
        raise CorruptCheckpointError(
            f"{path}: truncated or corrupt PyTorch checkpoint ({e})"
        ) from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for name, tensor in state.items():
        yield name, _convert(tensor, dtype, name)
