"""The models `sage-llm bench quality` compares: one dense checkpoint, requantized each way.

Every variant is built from the same dense weights (a GGUF file dequantized, or a Hugging Face
checkpoint in the dense dtype), so the rows differ only by their weight format:
- "file": the GGUF file itself, its blocks kept as stored (gguf_linear), when the model is one;
- "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0": the decoder's Linear weights requantized to that GGUF
  type with the `gguf` package's quantizer (the embedding and LM head stay dense, as they do for
  int8 / int4, so the rows compare like for like);
- "int8", "int4" (groups of 128, or the largest of 64 / 32 dividing a layer's input size), "fp8"
  (CUDA): quantized at load by the weight methods of sagellm.models.layers.quant_weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sagellm.models.gguf_loader import GGUFWeight
from sagellm.models.layers.linear import gguf_native_types
from sagellm.models.layers.quant_weights import (
    QUANTIZATIONS,
    apply_quantization,
    check_quantization,
)
from sagellm.models.registry import build_model

# GGUF types the gguf package can quantize to (it has no K-quant quantizer).
GGUF_REQUANT = {"Q8_0": 8, "Q5_1": 7, "Q5_0": 6, "Q4_1": 3, "Q4_0": 2}
WEIGHT_FORMATS = ("dense", "file", *GGUF_REQUANT, *QUANTIZATIONS)
# Names of dense tables that stay dense in every variant.
_TABLES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "wpe.weight")


def unavailable(fmt: str, device: torch.device, source_kind: str, model_cls: Any) -> str | None:
    """Why `fmt` cannot run here (a note for the report), or None when it can."""
    if fmt == "file":
        if source_kind != "gguf":
            return "file: the model is not a GGUF file"
        if not gguf_native_types(device):
            return f"file: gguf_linear has no {device.type} kernel in this build"
    if fmt in GGUF_REQUANT:
        if GGUF_REQUANT[fmt] not in gguf_native_types(device):
            return f"{fmt}: gguf_linear has no {device.type} kernel in this build"
        if getattr(model_cls, "transposed_names", None):
            return f"{fmt}: {model_cls.__name__} stores Conv1D weights transposed"
    if fmt in QUANTIZATIONS:
        try:
            check_quantization(fmt, device)
        except ValueError as exc:
            return str(exc)
    return None


def requantize_gguf(weights: dict[str, Any], qtype: int) -> dict[str, Any]:
    """`weights` with each decoder Linear weight requantized to GGML type `qtype` (rows of
    blocks, as a GGUF file stores them); tables, norms and biases unchanged."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    out = {}
    for name, t in weights.items():
        if isinstance(t, torch.Tensor) and t.dim() == 2 and not name.endswith(_TABLES):
            arr = t.detach().float().cpu().numpy()
            blocks = np.ascontiguousarray(quantize(arr, GGMLQuantizationType(qtype)))
            out[name] = GGUFWeight(name, torch.from_numpy(blocks), qtype, tuple(t.shape))
        else:
            out[name] = t
    return out


def build_variant(
    fmt: str,
    config,
    dense_weights: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    file_weights: dict[str, Any] | None = None,
):
    """The model of weight format `fmt`, loaded and ready (see the module docstring)."""
    model = build_model(config, dtype, device)
    if fmt in QUANTIZATIONS:
        apply_quantization(model, fmt)
    if fmt == "file":
        if file_weights is None:
            raise ValueError("fmt = 'file' needs the file's own weights")
        weights = file_weights
    elif fmt in GGUF_REQUANT:
        weights = requantize_gguf(dense_weights, GGUF_REQUANT[fmt])
    elif fmt in ("dense", *QUANTIZATIONS):
        weights = dense_weights
    else:
        raise ValueError(
            f"format = {fmt!r} is invalid: expected one of {', '.join(WEIGHT_FORMATS)}"
        )
    model.load_weights(weights.items())
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, shared (tied) ones once: what the variant keeps in memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
