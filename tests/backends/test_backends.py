"""The backend registry: built-in cpu/cuda/ascend descriptors, auto resolution, and plugins
from the `sagellm.backends` entry-point group (class, instance or factory; broken ones reported)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from sagellm import backends
from sagellm.backends import Backend, get_backend, list_backends, plugin_errors, resolve_backend


class FakeChip(Backend):
    name = "fakechip"
    priority = 1000
    dtypes = ("float16",)

    def is_available(self) -> bool:
        return True

    def device(self, index=None):
        self._check_index(index)
        return torch.device("cpu")


def not_a_backend() -> int:
    return 42


def make_fake() -> Backend:
    b = FakeChip()
    b.name = ""  # the registry names it after the entry point
    return b


def test_builtins():
    found = list_backends()
    assert list(found)[:3] == ["cpu", "cuda", "ascend"]
    cpu = found["cpu"]
    assert cpu.is_available() and cpu.device() == torch.device("cpu")
    mem = cpu.memory_info()
    assert mem.total_bytes > 0 and 0 <= mem.free_bytes <= mem.total_bytes
    d = cpu.describe()
    assert d["available"] and d["device"] == "cpu" and "float32" in d["dtypes"]
    assert found["cuda"].is_available() == torch.cuda.is_available()
    assert resolve_backend("cpu").name == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")
def test_unavailable_backends_say_so():
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        get_backend("cuda").device()
    assert get_backend("cuda").memory_info() is None
    assert "device" not in get_backend("cuda").describe()
    with pytest.raises(ValueError, match="backend = 'cuda' is not available"):
        resolve_backend("cuda")
    assert resolve_backend("auto").name == "cpu"


def test_bad_names_and_indices():
    with pytest.raises(ValueError, match="backend = 'tpu' is unknown; known backends: ascend, cpu"):
        get_backend("tpu")
    with pytest.raises(ValueError, match=r"device index = 3 is out of range \[0, 1\)"):
        get_backend("cpu").device(3)


@pytest.fixture
def fake_entry_points(monkeypatch):
    def install(**targets: str):
        eps = [
            importlib.metadata.EntryPoint(name, value, backends.ENTRY_POINT_GROUP)
            for name, value in targets.items()
        ]
        real = importlib.metadata.entry_points

        def entry_points(**kw):
            if kw.get("group") == backends.ENTRY_POINT_GROUP:
                return importlib.metadata.EntryPoints(eps)
            return real(**kw)

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    return install


def test_plugins_class_instance_factory_and_broken(fake_entry_points):
    mod = __name__
    fake_entry_points(
        fakechip=f"{mod}:FakeChip",
        factorychip=f"{mod}:make_fake",
        missing=f"{mod}:NoSuchThing",
        notabackend=f"{mod}:not_a_backend",
        cpu="sagellm.backends.cpu:CPUBackend",  # our own registration: not a duplicate
    )
    found = list_backends()
    assert list(found) == ["cpu", "cuda", "ascend", "fakechip", "factorychip"]
    assert found["factorychip"].name == "factorychip"
    assert resolve_backend("auto").name == "fakechip"  # highest priority among the available
    errors = plugin_errors()
    assert set(errors) == {"missing", "notabackend"}
    assert "AttributeError" in errors["missing"]
    assert "not a sagellm.backends.Backend" in errors["notabackend"]
