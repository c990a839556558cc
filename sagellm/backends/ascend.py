"""The Ascend backend: Huawei NPUs through torch-npu (which adds `torch.npu` when imported)."""

from __future__ import annotations

import importlib.util

import torch

from sagellm.backends.base import Backend, MemoryInfo


def _torch_npu():
    # Imported only when installed: torch_npu patches torch at import time.
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        import torch_npu  # noqa: F401
    except Exception:  # a broken CANN install must not break `sage-llm info`
        return None
    return getattr(torch, "npu", None)


class AscendBackend(Backend):
    name = "ascend"
    description = "Huawei Ascend NPUs through torch-npu (needs the CANN toolkit)"
    priority = 100
    dtypes = ("float32", "bfloat16", "float16")

    def is_available(self) -> bool:
        npu = _torch_npu()
        try:
            return bool(npu is not None and npu.is_available())
        except Exception:
            return False

    def device_count(self) -> int:
        npu = _torch_npu()
        return int(npu.device_count()) if self.is_available() else 0

    def device(self, index: int | None = None) -> torch.device:
        if not self.is_available():
            raise RuntimeError("backend 'ascend' is not available: torch-npu or an NPU is missing")
        return torch.device("npu", self._check_index(index))

    def memory_info(self, index: int = 0) -> MemoryInfo | None:
        if not self.is_available():
            return None
        free, total = _torch_npu().mem_get_info(self._check_index(index))
        return MemoryInfo(int(total), int(free))
