"""What a hardware backend tells the rest of sageLLM: whether it is usable here, which torch
device it drives, which dtypes its kernels take, and how much memory it has."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    free_bytes: int

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "free_bytes": self.free_bytes}


class Backend(abc.ABC):
    """A hardware backend descriptor. Third-party backends subclass this and register the class
    (or an instance, or a zero-argument factory) under the `sagellm.backends` entry-point group."""

    name: str = ""
    description: str = ""
    # Higher wins when the backend kind is "auto" and several are available.
    priority: int = 0
    dtypes: tuple[str, ...] = ()

    @abc.abstractmethod
    def is_available(self) -> bool:
        """True when this process can run on the backend now (driver, device and torch build)."""

    @abc.abstractmethod
    def device(self, index: int | None = None) -> torch.device:
        """The torch device for device `index` (None: the default one)."""

    def device_count(self) -> int:
        return 1 if self.is_available() else 0

    def memory_info(self, index: int = 0) -> MemoryInfo | None:
        """Total and free memory of device `index`; None when it cannot be queried."""
        return None

    def describe(self) -> dict:
        """A JSON-friendly summary for `sage-llm info`."""
        available = self.is_available()
        out: dict = {
            "name": self.name,
            "description": self.description,
            "available": available,
            "priority": self.priority,
            "dtypes": list(self.dtypes),
        }
        if available:
            out["device"] = str(self.device())
            out["device_count"] = self.device_count()
            mem = self.memory_info()
            if mem is not None:
                out["memory"] = mem.to_dict()
        return out

    def _check_index(self, index: int | None) -> int:
        count = self.device_count()
        idx = 0 if index is None else index
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < max(count, 1):
            raise ValueError(
                f"device index = {index!r} is out of range [0, {max(count, 1)}) "
                f"for backend {self.name!r}"
            )
        return idx
