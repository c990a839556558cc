"""Model loading: configs, weights (Hugging Face safetensors/.bin, GGUF), tokenizers, resolution.

Names are imported on first use, so `import sagellm.models` stays cheap (no transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "config",
    "SUPPORTED_ARCHITECTURES": "config",
    "ModelLoadError": "errors",
    "ModelNotFoundError": "errors",
    "UnsupportedModelError": "errors",
    "CorruptCheckpointError": "errors",
    "ChatTemplateError": "errors",
    "LoadedCheckpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "resolve_dtype": "checkpoint",
    "ResolvedModel": "resolve",
    "resolve_model": "resolve",
    "Tokenizer": "tokenizer",
    "default_model_path": "default_model",
    "GGUFFile": "gguf_loader",
    "RawGGUFTensor": "gguf_loader",
    "iter_gguf_raw": "gguf_loader",
    "load_gguf_weights": "gguf_loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sagellm.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sagellm.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
