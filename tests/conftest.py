"""Shared fixtures: the CPU ISAs to run kernels on, and the devices present."""

from __future__ import annotations

import pytest
import torch

import sagellm  # noqa: F401  (registers torch.ops.sagellm)
from sagellm import ops


def _devices() -> list[str]:
    devs = ["cpu"]
    if torch.cuda.is_available() and ops.build_info()["cuda"]:
        devs.append("cuda")
    return devs


DEVICES = _devices()


@pytest.fixture(params=ops.build_info()["cpu_isas_supported"])
def cpu_isa(request):
    """Run the test once per CPU ISA this machine and build support (scalar, avx2, avx512)."""
    before = ops.cpu_isa()
    ops.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        ops.set_cpu_isa(before)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device present: the CPU always, CUDA when a GPU and CUDA kernels exist."""
    return request.param


@pytest.fixture
def seeded():
    """Fresh but reproducible random inputs per test."""
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)
