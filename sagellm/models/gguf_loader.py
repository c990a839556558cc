"""GGUF files: header, hyper-parameters, and tensors under their Hugging Face names.

Two levels. `iter_gguf_raw` yields each tensor as stored (quantized blocks untouched) under its
transformers name. `load_gguf_weights` builds on it: tensors of the types named in `keep_types`
stay as the file stores them (a `GGUFWeight`: uint8 rows of blocks, for layers that multiply with
the native gguf_linear kernel); every other tensor is dequantized with `gguf.quants.dequantize`
into the requested dtype.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view per
string, which takes 2-4 s for SmolLM2's 98k vocabulary and merge strings, longer than dequantizing
all of its weights. Here string arrays are skipped and only their length is kept.

What llama.cpp's converter changed is undone, so the weights equal what transformers loads:
- llama: Q and K rows were permuted per head from HF's rotate-half layout to interleaved pairs;
  `_unpermute_rows` restores them (as transformers' LlamaTensorProcessor does). It moves whole
  rows, so it is exact on quantized blocks too.
- gemma3: every `*norm.weight` was stored as w + 1; 1 is subtracted in fp32, as transformers does.
- gpt2: Conv1D weights were stored transposed ([out, in]); they are transposed back.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import _type_traits as _DEQUANTIZERS
from gguf.quants import dequantize

from sagellm.models.config import ModelConfig
from sagellm.models.errors import CorruptCheckpointError, UnsupportedModelError

_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
DEQUANTIZABLE_TYPES = frozenset(FLOAT_TYPES | set(_DEQUANTIZERS))


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape in torch order (ggml lists dimensions reversed)
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (string arrays as their length) and `tensors`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: empty file
            raise CorruptCheckpointError(f"{self.path}: cannot map GGUF file ({e})") from e
        self.data = np.frombuffer(self._mm, dtype=np.uint8)
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise CorruptCheckpointError(
                f"{self.path}: GGUF header is truncated or malformed ({e})"
            ) from e

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def _parse(self) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
        buf, size = self._mm, len(self._mm)
        if buf[:4] != b"GGUF":
            raise CorruptCheckpointError(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise CorruptCheckpointError(f"{self.path}: GGUF version {version} is not 2 or 3")
        pos, metadata = 24, {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = self._value(pos + 4, vtype)
        if "general.architecture" not in metadata:
            raise CorruptCheckpointError(
                f"{self.path}: no general.architecture in the GGUF metadata"
            )
        entries = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            entries.append((name, tuple(reversed(dims)), type_id, offset))
        align = int(metadata.get("general.alignment", 32))
        data_start = (pos + align - 1) // align * align
        tensors = []
        for name, shape, type_id, offset in entries:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} has unknown ggml type id {type_id}"
                ) from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            if not shape or shape[-1] % block:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {name!r} shape {shape} is not a whole number of "
                    f"{qtype.name} blocks of {block}"
                )
            nbytes = int(np.prod(shape)) // block * block_bytes
            start = data_start + offset
            if start + nbytes > size:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {start + nbytes} but the file has "
                    f"{size} bytes (truncated?)"
                )
            tensors.append(GGUFTensorInfo(name, qtype, shape, start, nbytes))
        return metadata, tensors

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._mm, pos)
        if pos + 8 + n > len(self._mm):
            raise struct.error(f"string at byte {pos} runs past the end of the file")
        return self._mm[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

    def _value(self, pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _SCALAR:
            (v,) = struct.unpack_from(_SCALAR[vtype], self._mm, pos)
            return v, pos + struct.calcsize(_SCALAR[vtype])
        if vtype == _STRING:
            return self._string(pos)
        if vtype != _ARRAY:
            raise struct.error(f"unknown metadata value type {vtype} at byte {pos}")
        etype, count = struct.unpack_from("<IQ", self._mm, pos)
        pos += 12
        if etype in _SCALAR:
            width = struct.calcsize(_SCALAR[etype])
            if pos + count * width > len(self._mm):
                raise struct.error(f"array at byte {pos} runs past the end of the file")
            values = np.frombuffer(self._mm, _SCALAR[etype], count, pos)
            return (values.tolist() if count <= 4096 else values), pos + count * width
        if etype != _STRING:
            raise struct.error(f"unsupported metadata array element type {etype} at byte {pos}")
        for _ in range(count):  # vocabularies: skip, the tokenizer reads them itself
            (n,) = struct.unpack_from("<Q", self._mm, pos)
            pos += 8 + n
        if pos > len(self._mm):
            raise struct.error("string array runs past the end of the file")
        return count, pos

    def tensor_data(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored bytes as [rows, bytes per row] uint8 (or the float values), zero-copy."""
        raw = self.data[info.offset : info.offset + info.nbytes]
        if info.ggml_type in FLOAT_TYPES:
            dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[info.ggml_type.name]
            return raw.view(dt).reshape(info.shape)
        block, block_bytes = GGML_QUANT_SIZES[info.ggml_type]
        return raw.reshape(*info.shape[:-1], info.shape[-1] // block * block_bytes)


# ---- hyper-parameters -------------------------------------------------------------------------

_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def gguf_config_dict(f: GGUFFile) -> dict[str, Any]:
    """A transformers-style config.json dict from the GGUF metadata."""
    md, arch = f.metadata, f.architecture
    if arch not in ("llama", "qwen2", "qwen3", "gemma3", "gpt2"):
        raise UnsupportedModelError(
            f"{f.path}: unsupported GGUF architecture {arch!r}; supported: gemma3, gpt2, llama, qwen2, qwen3"
        )

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{name}", default)

    def need(name: str) -> Any:
        if f"{arch}.{name}" not in md:
            raise CorruptCheckpointError(f"{f.path}: GGUF metadata has no {arch}.{name}")
        return md[f"{arch}.{name}"]

    names = {t.name for t in f.tensors}
    vocab = key("vocab_size") or md.get("tokenizer.ggml.tokens")
    if not isinstance(vocab, int):
        vocab = next(t.shape[0] for t in f.tensors if t.name == "token_embd.weight")
    types = {t.ggml_type for t in f.tensors}
    dtype = "float32"
    if types <= FLOAT_TYPES:  # an unquantized file: its half type is the model's (norms stay F32)
        dtype = (
            "bfloat16"
            if GGMLQuantizationType.BF16 in types
            else ("float16" if GGMLQuantizationType.F16 in types else "float32")
        )
    common = {
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "_name_or_path": md.get("general.name", ""),
    }
    if arch == "gpt2":
        return {
            "architectures": [_HF_CLASS[arch]],
            "model_type": "gpt2",
            **common,
            "n_embd": need("embedding_length"),
            "n_layer": need("block_count"),
            "n_head": need("attention.head_count"),
            "n_positions": need("context_length"),
            "n_inner": key("feed_forward_length"),
            "layer_norm_epsilon": key("attention.layer_norm_epsilon", 1e-5),
            "activation_function": "gelu_new",
        }

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise UnsupportedModelError(
                f"{f.path}: per-layer KV head counts {sorted(set(kv_heads))}"
            )
        kv_heads = kv_heads[0]
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    rot_dim = key("rope.dimension_count")
    window = key("attention.sliding_window")
    model_type = {"gemma3": "gemma3_text", "llama": "mistral" if window else "llama"}.get(
        arch, arch
    )
    d = {
        "architectures": [_HF_CLASS[model_type.removesuffix("_text")]],
        "model_type": model_type,
        **common,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_output.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "sliding_window": window,
    }
    if rot_dim and arch != "llama" and rot_dim != head_dim:
        d["partial_rotary_factor"] = rot_dim / head_dim
    scaling = key("rope.scaling.type")
    if scaling and scaling != "none":
        d["rope_scaling"] = {"rope_type": scaling, "factor": key("rope.scaling.factor", 1.0)}
        if key("rope.scaling.original_context_length"):
            d["rope_scaling"]["original_max_position_embeddings"] = key(
                "rope.scaling.original_context_length"
            )
    if arch in ("qwen2", "qwen3") and window:
        d["use_sliding_window"] = True
    if arch == "gemma3":
        # not stored by llama.cpp: it hard-codes these for gemma3, and so does transformers' config
        pattern = key("attention.sliding_window_pattern", 6)
        d.update(
            hidden_activation="gelu_pytorch_tanh",
            rope_local_base_freq=10_000.0,
            sliding_window_pattern=pattern if isinstance(pattern, int) else 6,
            # llama.cpp scales attention by 1/sqrt(head_dim), except gemma3-27B (62 layers)
            query_pre_attn_scalar=hidden // heads if d["num_hidden_layers"] == 62 else head_dim,
        )
        if isinstance(pattern, list):  # newer converters: one bool per layer, True = sliding
            d["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    return d


# ---- tensor names -----------------------------------------------------------------------------

_DECODER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GEMMA3_NAMES = {
    **_DECODER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_TRANSPOSED = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors; transformers ignores them too


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The transformers parameter name of a GGUF tensor, or None for one transformers ignores."""
    if gguf_name in _SKIPPED:
        return None
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    if arch == "gpt2":
        top = {
            "token_embd": "transformer.wte",
            "position_embd": "transformer.wpe",
            "output_norm": "transformer.ln_f",
            "output": "lm_head",
        }
    base, _, suffix = gguf_name.rpartition(".")
    if base in top:
        return f"{top[base]}.{suffix}"
    m = _BLOCK.fullmatch(gguf_name)
    table = {"gpt2": _GPT2_NAMES, "gemma3": _GEMMA3_NAMES}.get(arch, _DECODER_NAMES)
    if m is None or m.group(2) not in table:
        raise UnsupportedModelError(
            f"GGUF tensor {gguf_name!r} has no {arch} counterpart in transformers"
        )
    layer, part, suffix = m.groups()
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    return f"{prefix}.{layer}.{table[part]}.{suffix}"


# ---- raw and dequantized tensors ------------------------------------------------------------------


@dataclass(frozen=True)
class RawGGUFTensor:
    """One tensor as stored, under its transformers name.

    `data`: for block types uint8 [*shape[:-1], bytes per row]; for F32/F16 their values; BF16 as
    uint16 bit patterns. Q/K rows are already in transformers' order. `shape` is the logical shape
    of `data` (torch order). `transposed`: the transformers parameter is `data`'s transpose (gpt2
    Conv1D). `norm_offset`: subtract this from the values to get the transformers parameter.
    """

    name: str
    data: np.ndarray
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    transposed: bool = False
    norm_offset: float = 0.0


def iter_gguf_raw(f: GGUFFile, config: ModelConfig) -> Iterator[RawGGUFTensor]:
    """Every tensor of `f` without dequantizing, renamed and un-permuted for transformers."""
    arch = f.architecture
    for info in f.tensors:
        name = hf_name(info.name, arch)
        if name is None:
            continue
        data = f.tensor_data(info)
        part = info.name.split(".")[-2]
        if arch == "llama" and part in ("attn_q", "attn_k"):
            heads = config.num_heads if part == "attn_q" else config.num_kv_heads
            data = data[_unpermute_rows(info.shape[0], heads, info.name)]
        offset = 1.0 if arch == "gemma3" and info.name.endswith("norm.weight") else 0.0
        transposed = arch == "gpt2" and part in _GPT2_TRANSPOSED and info.name.endswith(".weight")
        yield RawGGUFTensor(name, data, info.ggml_type, info.shape, transposed, offset)


def _unpermute_rows(rows: int, heads: int, name: str) -> np.ndarray:
    """Row indices taking llama.cpp's interleaved rotary layout back to HF's rotate-half layout.

    llama.cpp stored HF row (h, a, i) (head h, half a of the head, index i in the half) at (h, i, a).
    """
    if rows % (2 * heads):
        raise CorruptCheckpointError(
            f"{name}: {rows} rows do not split into {heads} heads of even size"
        )
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def dequantize_raw(t: RawGGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    """The transformers parameter for a raw tensor, in `dtype`."""
    if t.ggml_type not in DEQUANTIZABLE_TYPES:
        raise UnsupportedModelError(
            f"GGUF tensor {t.name!r} has type {t.ggml_type.name}, which cannot be dequantized; "
            f"supported: {', '.join(sorted(q.name for q in DEQUANTIZABLE_TYPES))}"
        )
    if t.ggml_type == GGMLQuantizationType.BF16:
        out = torch.from_numpy(np.ascontiguousarray(t.data)).view(torch.bfloat16).float()
    elif t.ggml_type == GGMLQuantizationType.F32:
        out = torch.from_numpy(t.data.copy())  # the mmap is read-only
    else:
        out = torch.from_numpy(np.asarray(dequantize(t.data, t.ggml_type), dtype=np.float32))
    out = out.reshape(t.shape)
    if t.norm_offset:
        out -= t.norm_offset
    if t.transposed:
        out = out.T
    return out.to(dtype).contiguous()


@dataclass(frozen=True)
class GGUFWeight:
    """A 2-d weight kept in its GGUF block format: what a quantized layer stores.

    `data`: uint8 [rows, bytes per row], contiguous and owned (not a view of the file): row r is
    the blocks of row r exactly as the file stores them (Q/K rows already in transformers' order).
    `qtype`: the GGML type id. `shape`: the logical (rows, columns) of `data`. `transposed`: the
    transformers parameter is the transpose of `data` (gpt2 Conv1D); `t()` flips it, as
    CausalLM.load_weights does for those names, so a layer sees an (out, in) weight when False.
    """

    name: str
    data: torch.Tensor
    qtype: int
    shape: tuple[int, int]
    transposed: bool = False

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.qtype).name

    def t(self) -> GGUFWeight:
        return replace(self, transposed=not self.transposed)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense transformers parameter, in `dtype` (for a place with no quantized kernel)."""
        out = torch.from_numpy(
            np.asarray(dequantize(self.data.numpy(), GGMLQuantizationType(self.qtype)))
        ).reshape(self.shape)
        return (out.T if self.transposed else out).to(dtype).contiguous()


def _keep_raw(t: RawGGUFTensor) -> GGUFWeight:
    data = t.data if t.data.flags.writeable and t.data.flags.c_contiguous else t.data.copy()
    rows, cols = t.shape
    return GGUFWeight(t.name, torch.from_numpy(data), int(t.ggml_type), (rows, cols), t.transposed)


def load_gguf_weights(
    f: GGUFFile,
    config: ModelConfig,
    dtype: torch.dtype,
    progress: bool = False,
    workers: int | None = None,
    keep_types: Collection[int] = (),
) -> tuple[dict[str, torch.Tensor | GGUFWeight], dict[str, str]]:
    """(transformers name -> tensor, transformers name -> stored type name).

    A 2-d tensor whose GGML type id is in `keep_types` comes back as a GGUFWeight (its blocks
    copied out of the file, untouched); every other tensor is dequantized to a tensor in
    `dtype`, on a thread pool: numpy releases the GIL in its array kernels.
    """
    raws = list(iter_gguf_raw(f, config))
    kept = {t.name for t in raws if int(t.ggml_type) in keep_types and len(t.shape) == 2}
    for t in raws:  # fail before any work, naming the first tensor of an unsupported type
        if t.name not in kept and t.ggml_type not in DEQUANTIZABLE_TYPES:
            dequantize_raw(t, dtype)
    from tqdm import tqdm

    bar = tqdm(total=len(raws), desc="Loading GGUF weights", unit="tensor", disable=not progress)
    out: dict[str, torch.Tensor | GGUFWeight] = {}
    workers = workers or min(8, os.cpu_count() or 1)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        # biggest first, so the pool does not end on one large tensor
        order = sorted(raws, key=lambda t: -t.data.nbytes)
        futures = {}
        for t in order:
            if t.name in kept:
                futures[pool.submit(_keep_raw, t)] = t.name
            else:
                futures[pool.submit(dequantize_raw, t, dtype)] = t.name
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            bar.update()
    weights = {t.name: out[t.name] for t in raws}
    return weights, {t.name: t.ggml_type.name for t in raws}
