"""Architecture name -> model class, and building a model from a loaded checkpoint."""

from __future__ import annotations

import torch

from sagellm.models.base import CausalLM
from sagellm.models.config import ModelConfig
from sagellm.models.errors import UnsupportedModelError


def model_class(architecture: str) -> type[CausalLM]:
    if architecture in ("llama", "mistral", "qwen2", "qwen3"):
        from sagellm.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if architecture == "gemma3":
        from sagellm.models.gemma3 import Gemma3ForCausalLM

        return Gemma3ForCausalLM
    if architecture == "gpt2":
        from sagellm.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel
    raise UnsupportedModelError(
        f"architecture {architecture!r} is not supported "
        "(llama, mistral, qwen2, qwen3, gemma3, gpt2 are)"
    )


def build_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    with torch.device(device):
        model = model_class(config.architecture)(config, dtype, device)
    return model.eval().requires_grad_(False)
