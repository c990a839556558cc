"""Checkpoints read slice by slice, for tensor-parallel ranks: no rank copies a whole tensor that
it holds only part of.

`load_sharded_checkpoint` is `load_checkpoint` with lazy weights: each weight is a `LazyWeight`
over the memory-mapped file (safetensors through `get_slice`, GGUF through its mmap, .bin
through torch's mmap). A layer narrows it to its rows or columns (`narrow`) and only that slice
is read, converted or dequantized; replicated tensors (norms, biases) are read whole (`load`).

GGUF blocks: a row split keeps whole rows, so it is exact in any block format. A column split
keeps the blocks when it starts and ends on block boundaries (K / tp a multiple of the block
size); otherwise that slice is dequantized, and a log line names the layer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from sagellm.models.config import ModelConfig
from sagellm.models.errors import UnsupportedModelError
from sagellm.models.gguf_loader import (
    GGUFFile,
    GGUFTensorInfo,
    GGUFWeight,
    RawGGUFTensor,
    _unpermute_rows,
    dequantize_raw,
    hf_name,
)
from sagellm.models.safetensors_loader import _convert

log = logging.getLogger("sagellm.models")


class LazyWeight:
    """A checkpoint tensor not read yet: `shape` (the transformers parameter's), `narrow` reads a
    slice, `load` all of it. `keeps_blocks`: the slices come back as GGUFWeight (kept in their
    GGUF block format), else as tensors in the load dtype."""

    name: str
    shape: tuple[int, ...]
    keeps_blocks = False

    def narrow(self, dim: int, start: int, size: int, what: str = ""):
        raise NotImplementedError

    def load(self):
        return self.narrow(0, 0, self.shape[0]) if self.shape else self._scalar()

    def _scalar(self):
        raise NotImplementedError

    def t(self):
        raise UnsupportedModelError(
            f"{self.name}: transposed (Conv1D) weights cannot be loaded slice by slice"
        )


def _check_range(name: str, shape, dim: int, start: int, size: int) -> None:
    if dim >= len(shape) or start < 0 or size < 0 or start + size > shape[dim]:
        raise ValueError(
            f"{name}: slice [{start}, {start + size}) of dim {dim} is outside shape {tuple(shape)}"
        )


class TensorWeight(LazyWeight):
    """A tensor backed by a mapped file (safetensors slice handle, or an mmap'd .bin tensor)."""

    def __init__(self, name: str, source, shape, dtype: torch.dtype):
        self.name, self._source, self.shape, self._dtype = name, source, tuple(shape), dtype

    def narrow(self, dim: int, start: int, size: int, what: str = ""):
        _check_range(self.name, self.shape, dim, start, size)
        index = (slice(None),) * dim + (slice(start, start + size),)
        return _convert(self._source[index], self._dtype, self.name).contiguous()

    def _scalar(self):
        return _convert(self._source[...], self._dtype, self.name)


class GGUFTensorWeight(LazyWeight):
    """A GGUF tensor in the mapped file, renamed and un-permuted as gguf_loader does."""

    def __init__(
        self,
        f: GGUFFile,
        info: GGUFTensorInfo,
        raw: RawGGUFTensor,
        rows,
        keep: bool,
        dtype: torch.dtype,
    ):
        self.name, self.shape = raw.name, tuple(raw.shape)
        self._info, self._raw, self._rows, self._dtype = info, raw, rows, dtype
        self.keeps_blocks = keep and len(self.shape) == 2

    def _slice(self, data: np.ndarray, shape) -> RawGGUFTensor:
        r = self._raw
        return RawGGUFTensor(r.name, data, r.ggml_type, tuple(shape), r.transposed, r.norm_offset)

    def narrow(self, dim: int, start: int, size: int, what: str = ""):
        _check_range(self.name, self.shape, dim, start, size)
        data = self._raw.data
        if dim == 0:
            part = (
                data[self._rows[start : start + size]]
                if self._rows is not None
                else (data[start : start + size])
            )
            shape = (size, *self.shape[1:])
            if self.keeps_blocks:
                return GGUFWeight(
                    self.name,
                    torch.from_numpy(np.array(part, copy=True)),
                    int(self._raw.ggml_type),
                    shape,
                )
            return dequantize_raw(self._slice(part, shape), self._dtype)
        rows = data[self._rows] if self._rows is not None else data
        qtype = self._raw.ggml_type
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if qtype.name in ("F32", "F16", "BF16"):  # values, not blocks
            block, block_bytes = 1, 1
        if start % block or size % block:
            log.info(
                "%s: columns [%d, %d) do not fall on %s blocks of %d; this slice is dequantized",
                what or self.name,
                start,
                start + size,
                qtype.name,
                block,
            )
            return dequantize_raw(self._raw, self._dtype)[:, start : start + size].contiguous()
        lo, hi = start // block * block_bytes, (start + size) // block * block_bytes
        part = np.array(rows[:, lo:hi], copy=True)
        if self.keeps_blocks:
            return GGUFWeight(self.name, torch.from_numpy(part), int(qtype), (self.shape[0], size))
        return dequantize_raw(self._slice(part, (self.shape[0], size)), self._dtype)

    def _scalar(self):
        return dequantize_raw(self._raw, self._dtype)


def narrow_gguf(w: GGUFWeight, dim: int, start: int, size: int, what: str):
    """Rows or columns of a GGUFWeight: blocks kept when the slice is block-aligned, else the
    slice dequantized (fp32) with a log line."""
    rows, cols = w.shape
    if w.transposed:
        raise UnsupportedModelError(f"{what}: transposed GGUF weights cannot be split")
    _check_range(w.name, w.shape, dim, start, size)
    if dim == 0:
        return GGUFWeight(w.name, w.data[start : start + size].contiguous(), w.qtype, (size, cols))
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(w.qtype)]
    if start % block == 0 and size % block == 0:
        lo, hi = start // block * block_bytes, (start + size) // block * block_bytes
        return GGUFWeight(w.name, w.data[:, lo:hi].contiguous(), w.qtype, (rows, size))
    log.info(
        "%s: columns [%d, %d) do not fall on %s blocks of %d; this slice is dequantized",
        what,
        start,
        start + size,
        w.type_name,
        block,
    )
    return w.dequantize(torch.float32)[:, start : start + size].contiguous()


# ---- whole checkpoints --------------------------------------------------------------------------


def _gguf_weights(f: GGUFFile, config: ModelConfig, dtype, keep_types) -> dict[str, LazyWeight]:
    arch = f.architecture
    out: dict[str, LazyWeight] = {}
    for info in f.tensors:
        name = hf_name(info.name, arch)
        if name is None:
            continue
        part = info.name.split(".")[-2]
        if arch == "gpt2":
            raise UnsupportedModelError("gpt2 has no tensor-parallel implementation")
        rows = None
        if arch == "llama" and part in ("attn_q", "attn_k"):
            heads = config.num_heads if part == "attn_q" else config.num_kv_heads
            rows = _unpermute_rows(info.shape[0], heads, info.name)
        offset = 1.0 if arch == "gemma3" and info.name.endswith("norm.weight") else 0.0
        raw = RawGGUFTensor(name, f.tensor_data(info), info.ggml_type, info.shape, False, offset)
        keep = int(info.ggml_type) in keep_types
        out[name] = GGUFTensorWeight(f, info, raw, rows, keep, dtype)
    return out


def _hf_weights(path: Path, dtype: torch.dtype) -> tuple[str, dict[str, LazyWeight]]:
    from sagellm.models.safetensors_loader import weight_files

    fmt, files = weight_files(path)
    out: dict[str, LazyWeight] = {}
    for file in files:
        if fmt == "safetensors":
            from safetensors import safe_open

            handle = safe_open(str(file), framework="pt")
            for name in handle.keys():  # noqa: SIM118  (safe_open is not iterable)
                sl = handle.get_slice(name)
                out[name] = TensorWeight(name, sl, sl.get_shape(), dtype)
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            for name, t in state.items():
                out[name] = TensorWeight(name, t, t.shape, dtype)
    return fmt, out


def load_sharded_checkpoint(
    model: str | Path | None,
    dtype,
    revision: str | None = None,
    trust_remote_code: bool = False,
    load_tokenizer: bool = True,
    quantized_on: torch.device | str | None = None,
):
    """load_checkpoint's result (a LoadedCheckpoint) with every weight a LazyWeight.

    dtype: a torch dtype or a callable (config, format) -> dtype, as for load_checkpoint.
    quantized_on: keep GGUF block weights as stored where gguf_linear runs them on this device.
    """
    from sagellm.models.checkpoint import LoadedCheckpoint, _read_json, resolve_dtype
    from sagellm.models.resolve import resolve_model
    from sagellm.models.tokenizer import Tokenizer

    if model is None:
        from sagellm.models.default_model import default_model_path

        model = default_model_path()
    resolved = resolve_model(str(model), revision)
    t0 = time.perf_counter()
    tokenizer = None
    if resolved.kind == "gguf":
        from sagellm.models.gguf_loader import gguf_config_dict
        from sagellm.models.layers.linear import gguf_native_types

        f = GGUFFile(resolved.path)
        config = ModelConfig.from_hf_dict(gguf_config_dict(f))
        fmt = "gguf"
        torch_dtype = dtype(config, fmt) if callable(dtype) else resolve_dtype(dtype, config)
        keep = gguf_native_types(quantized_on) if quantized_on is not None else frozenset()
        if torch_dtype not in (torch.float32, torch.bfloat16):
            keep = frozenset()
        weights = _gguf_weights(f, config, torch_dtype, keep)
        if load_tokenizer:
            extra = set(config.eos_token_ids)
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
                if isinstance(f.metadata.get(key), int):
                    extra.add(f.metadata[key])
            tokenizer = Tokenizer.from_gguf(resolved.path, config.hf_config["model_type"], extra)
        types = {w.name: w._raw.ggml_type.name for w in weights.values()}
    else:
        config = ModelConfig.from_hf_dict(_read_json(resolved.path / "config.json"))
        from sagellm.models.safetensors_loader import weight_files

        fmt = weight_files(resolved.path)[0]
        torch_dtype = dtype(config, fmt) if callable(dtype) else resolve_dtype(dtype, config)
        fmt, weights = _hf_weights(resolved.path, torch_dtype)
        if load_tokenizer:
            extra = set(config.eos_token_ids)
            gen = resolved.path / "generation_config.json"
            if gen.is_file():
                eos = _read_json(gen).get("eos_token_id")
                extra |= {eos} if isinstance(eos, int) else set(eos or ())
            tokenizer = Tokenizer.from_folder(resolved.path, extra, trust_remote_code)
        types = None
    if config.architecture == "gpt2":
        raise UnsupportedModelError("gpt2 has no tensor-parallel implementation")
    return LoadedCheckpoint(
        config,
        weights,
        tokenizer,
        str(resolved.path),
        fmt,
        torch_dtype,
        types,
        {"header": time.perf_counter() - t0},
    )
