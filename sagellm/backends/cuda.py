"""The CUDA backend: available when torch is a CUDA build and sees a GPU."""

from __future__ import annotations

import torch

from sagellm.backends.base import Backend, MemoryInfo


class CUDABackend(Backend):
    name = "cuda"
    description = "NVIDIA GPUs through a CUDA build of torch"
    priority = 50
    dtypes = ("float32", "bfloat16", "float16")

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count() if self.is_available() else 0

    def device(self, index: int | None = None) -> torch.device:
        if not self.is_available():
            raise RuntimeError("backend 'cuda' is not available: no CUDA device or CPU-only torch")
        return torch.device("cuda", self._check_index(index))

    def memory_info(self, index: int = 0) -> MemoryInfo | None:
        if not self.is_available():
            return None
        free, total = torch.cuda.mem_get_info(self._check_index(index))
        return MemoryInfo(int(total), int(free))

    def describe(self) -> dict:
        out = super().describe()
        if self.is_available():
            out["devices"] = [torch.cuda.get_device_name(i) for i in range(self.device_count())]
        return out
