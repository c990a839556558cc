"""Plugins through entry points: a small package written to tmp_path (a module plus a
`.dist-info` with entry_points.txt) registers a backend and an engine kind; `sage-llm info` in a
subprocess lists them, and the control plane serves a request through the plugin engine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = '''
"""A test plugin: a 'testchip' backend (runs on the CPU) and a 'testchip' engine kind that
wraps the native in-process engine."""
import torch

from sagellm.backends import Backend


class TestChipBackend(Backend):
    name = "testchip"
    description = "a plugin backend for the tests"
    priority = 1
    dtypes = ("float32",)

    def is_available(self):
        return True

    def device(self, index=None):
        self._check_index(index)
        return torch.device("cpu")


def make_engine(config, backend):
    from sagellm.control_plane import LocalEngine

    class TestChipEngine(LocalEngine):
        kind = "testchip"

        def info(self):
            return {**super().info(), "plugin": "sagellm-testplug"}

    native = config.model_copy(update={"kind": "native", "engine_id": "testchip-engine"})
    return TestChipEngine(native, backend.model_copy(update={"kind": "cpu"}))
'''

ENTRY_POINTS = """
[sagellm.backends]
testchip = sagellm_testplug:TestChipBackend
broken = sagellm_testplug:NoSuchBackend

[sagellm.engines]
testchip = sagellm_testplug:make_engine
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    (root / "sagellm_testplug.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "sagellm_testplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sagellm-testplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def test_info_lists_the_plugins(plugin_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGELLM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(ROOT)])
    r = subprocess.run(
        [sys.executable, "-m", "sagellm.cli.main", "info"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    backend = next(
        line for line in lines if line.strip().startswith("testchip ") and "dtypes" in line
    )
    assert "available — device cpu" in backend and backend.endswith("plugin")
    assert any(
        line.split() == ["testchip", "sagellm_testplug:make_engine", "—", "plugin"]
        for line in lines
    )
    assert any("broken" in line and "failed to load" in line for line in lines)
    assert any(
        line.split()[:2] == ["native", "sagellm.control_plane.engines:LocalEngine"]
        for line in lines
    )


def test_control_plane_serves_through_the_plugin_engine(plugin_dir, tmp_path_factory, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    from sagellm.backends import get_backend
    from sagellm.control_plane import BackendConfig, ControlPlaneManager, EngineConfig

    assert get_backend("testchip").device().type == "cpu"
    model = tmp_path_factory.getbasetemp() / "cli-tiny-llama"
    if not (model / "config.json").is_file():
        write_tiny_checkpoint("llama", model, load_reference_tokenizer())

    async def go():
        manager = ControlPlaneManager(
            backend_config=BackendConfig(kind="testchip"),
            engine_configs=[EngineConfig(kind="testchip", model=str(model), num_threads=1)],
        )
        async with manager:
            (handle,) = manager.engines()
            assert type(handle).__name__ == "TestChipEngine"
            assert handle.engine_id == "testchip-engine"
            assert handle.info()["plugin"] == "sagellm-testplug"
            return await manager.execute_request(
                prompt="Hello there", max_tokens=5, ignore_eos=True
            )

    response = asyncio.run(go())
    assert response.finish_reason == "length" and len(response.output_tokens) == 5
    assert response.engine_id == "testchip-engine"
