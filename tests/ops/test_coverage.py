"""Every op declared in csrc/torch_bindings.cpp has a CPU kernel, a CUDA kernel when CUDA was
built, a fake (meta) kernel, a typed wrapper and a pure-torch reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._library.simple_registry import singleton

from sagellm import ops

FAMILIES = {
    "paged_attention_decode": "attention",
    "paged_attention_prefill": "attention",
    "reshape_and_cache": "cache",
    "copy_blocks": "cache",
    "swap_blocks": "cache",
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "rotary_embedding": "rotary",
    "silu_and_mul": "activation",
    "gelu_and_mul": "activation",
    "dense_linear": "linear",
    "gguf_linear": "quant",
    "gguf_dequantize": "quant",
    "int8_linear": "quant",
    "int4_linear": "quant",
    "all_reduce": "comm",
    "all_gather": "comm",
    "broadcast": "comm",
}


# Ops whose CUDA kernel an open issue still owes (the engine keeps them off the GPU). The test
# fails as soon as such a kernel lands, so the list stays true.
CUDA_PENDING: dict[str, str] = {}


def declared_ops() -> list[str]:
    return sorted(
        {
            s.name.split("::")[1]
            for s in torch._C._jit_get_all_schemas()
            if s.name.startswith("sagellm::")
        }
    )


def test_every_declared_op_is_known_here():
    assert declared_ops() == sorted(FAMILIES), "a new op needs a family (wrapper, reference, tests)"


@pytest.mark.parametrize("op", sorted(FAMILIES))
def test_op_has_kernels_fake_wrapper_and_reference(op):
    name = f"sagellm::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{op}: no CPU kernel"
    if ops.build_info()["cuda"]:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        if op in CUDA_PENDING:
            assert not has_cuda, f"{op} has a CUDA kernel now: remove it from CUDA_PENDING"
        else:
            assert has_cuda, f"{op}: no CUDA kernel"
    assert singleton.find(name).fake_impl.kernel is not None, f"{op}: no fake kernel"
    family = FAMILIES[op]
    wrapper = importlib.import_module(f"sagellm.ops.{family}")
    reference = importlib.import_module(f"sagellm.ops.reference.{family}")
    assert callable(getattr(wrapper, op)), f"sagellm.ops.{family}.{op} missing"
    assert callable(getattr(reference, op)), f"sagellm.ops.reference.{family}.{op} missing"
    assert getattr(wrapper, op).__doc__, f"{op}: the wrapper needs a docstring with shapes"
