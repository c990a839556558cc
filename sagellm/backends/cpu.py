"""The CPU backend: always available; the native kernels cover fp32, bf16 and fp16."""

from __future__ import annotations

import os
import platform

import torch

from sagellm.backends.base import Backend, MemoryInfo


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * 1024  # reported in KiB
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """The CPU's marketing name ("Intel(R) Xeon(R) ..."), or the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CPUBackend(Backend):
    name = "cpu"
    description = "x86-64 / ARM CPUs: native kernels for AVX-512, AVX2 and plain C++"
    priority = 10
    dtypes = ("float32", "bfloat16", "float16")

    def is_available(self) -> bool:
        return True

    def device(self, index: int | None = None) -> torch.device:
        self._check_index(index)
        return torch.device("cpu")

    def describe(self) -> dict:
        return {**super().describe(), "model": cpu_model(), "cores": os.cpu_count()}

    def memory_info(self, index: int = 0) -> MemoryInfo | None:
        self._check_index(index)
        info = _meminfo()
        if "MemTotal" in info:
            return MemoryInfo(info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0)))
        try:  # not Linux: sysconf still knows the total
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            return MemoryInfo(total, free)
        except (ValueError, OSError, AttributeError):
            return None
