"""Gated MLP activations on the fused kernels: act(x[..., :d]) * x[..., d:]."""

from __future__ import annotations

import torch

from sagellm.models.errors import UnsupportedModelError
from sagellm.ops import activation as act_ops


def gated_activation(name: str):
    """The fused kernel for a Hugging Face `hidden_act` name."""
    if name in ("silu", "swish"):
        return act_ops.silu_and_mul
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: act_ops.gelu_and_mul(x, approximate="tanh")
    if name == "gelu":
        return lambda x: act_ops.gelu_and_mul(x, approximate="none")
    raise UnsupportedModelError(f"activation {name!r} is not supported")


def activation(name: str):
    """A plain (ungated) activation, for GPT-2 style MLPs."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    if name == "gelu":
        return torch.nn.functional.gelu
    if name in ("silu", "swish"):
        return torch.nn.functional.silu
    if name == "relu":
        return torch.relu
    raise UnsupportedModelError(f"activation {name!r} is not supported")
