"""Typed wrappers over torch.ops.sagellm.*, their fake kernels, and what the build contains.

Each op family has a module here (attention, cache, norm, rotary, activation) holding the typed
wrapper and its fake (meta) kernel; sagellm.ops.reference holds the pure-torch references the
tests compare against.
"""

from __future__ import annotations

from typing import Any

from sagellm import _C


def build_info() -> dict[str, Any]:
    """What this build of the native extension contains, and what the CPU kernels use now.

    Keys: cpu_isa (active: scalar, avx2 or avx512), cpu_isas_compiled, cpu_isas_supported,
    cuda (bool), cuda_arches (str), ascend (bool), torch_version (built against).
    """
    info = dict(_C.build_info())
    info["cpu_isa"] = _C.cpu_isa()
    return info


def cpu_isa() -> str:
    """The instruction set the CPU kernels use now: scalar, avx2 or avx512."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels onto one ISA; ValueError if the CPU or the build lacks it."""
    _C.set_cpu_isa(name)


def cuda_index_checks() -> bool:
    """Whether CUDA ops check index values (block ids, seq_lens, slots, positions)."""
    return _C.cuda_index_checks()


def set_cuda_index_checks(on: bool) -> None:
    """Check index values in CUDA ops too (off by default: each check copies the indices to the
    host and synchronises; never done while a CUDA graph is being captured). Also turned on by
    the environment variable SAGELLM_CUDA_CHECK_INDICES=1. CPU ops always check them."""
    _C.set_cuda_index_checks(bool(on))


# Importing the families registers every op's fake kernel, so torch.compile can trace any op
# as soon as sagellm.ops is imported.
from sagellm.ops import activation, attention, cache, comm, linear, norm, quant, rotary  # noqa: E402

__all__ = [
    "activation",
    "attention",
    "build_info",
    "cache",
    "comm",
    "cpu_isa",
    "cuda_index_checks",
    "linear",
    "norm",
    "quant",
    "rotary",
    "set_cpu_isa",
    "set_cuda_index_checks",
]
