"""Hardware backends: the built-in cpu, cuda and ascend descriptors, plus third-party ones
registered under the `sagellm.backends` entry-point group.

    from sagellm.backends import get_backend, list_backends, resolve_backend
    get_backend("cpu").memory_info()
    resolve_backend("auto").name        # the available backend with the highest priority

An entry point names a `Backend` subclass, a `Backend` instance or a zero-argument callable
returning one. A plugin that fails to load is reported (`plugin_errors()`), never fatal.
"""

from __future__ import annotations

import importlib.metadata

from sagellm.backends.ascend import AscendBackend
from sagellm.backends.base import Backend, MemoryInfo
from sagellm.backends.cpu import CPUBackend
from sagellm.backends.cuda import CUDABackend

ENTRY_POINT_GROUP = "sagellm.backends"
BUILTIN: dict[str, type[Backend]] = {
    "cpu": CPUBackend,
    "cuda": CUDABackend,
    "ascend": AscendBackend,
}

__all__ = [
    "ENTRY_POINT_GROUP",
    "AscendBackend",
    "Backend",
    "CPUBackend",
    "CUDABackend",
    "MemoryInfo",
    "get_backend",
    "list_backends",
    "plugin_errors",
    "resolve_backend",
]


def _instantiate(obj, where: str) -> Backend:
    if not isinstance(obj, Backend) and callable(obj):  # a class or a factory
        obj = obj()
    if not isinstance(obj, Backend):
        raise TypeError(f"{where} gave {type(obj).__name__}, not a sagellm.backends.Backend")
    return obj


def _discover() -> tuple[dict[str, Backend], dict[str, str]]:
    found: dict[str, Backend] = {name: cls() for name, cls in BUILTIN.items()}
    errors: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN and ep.value.startswith("sagellm.backends."):
            continue  # our own registration in pyproject.toml
        try:
            backend = _instantiate(ep.load(), f"entry point {ep.name} = {ep.value}")
        except Exception as e:  # a broken plugin must not take the CLI down
            errors[ep.name] = f"{type(e).__name__}: {e}"
            continue
        if not backend.name:
            backend.name = ep.name
        found[ep.name] = backend
    return found, errors


def list_backends() -> dict[str, Backend]:
    """Every backend known here (built-ins first, then plugins), by name. Discovered per call, so
    a plugin installed after import is seen."""
    return _discover()[0]


def plugin_errors() -> dict[str, str]:
    """Backend plugins that failed to load: name -> reason."""
    return _discover()[1]


def get_backend(name: str) -> Backend:
    backends = list_backends()
    if name not in backends:
        raise ValueError(
            f"backend = {name!r} is unknown; known backends: {', '.join(sorted(backends))}"
        )
    return backends[name]


def resolve_backend(kind: str = "auto") -> Backend:
    """The backend for a BackendConfig kind: "auto" picks the available one with the highest
    priority; a named one must be available."""
    if kind == "auto":
        usable = [b for b in list_backends().values() if b.is_available()]
        return max(usable, key=lambda b: b.priority)
    backend = get_backend(kind)
    if not backend.is_available():
        raise ValueError(f"backend = {kind!r} is not available on this machine")
    return backend
