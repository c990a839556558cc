"""EngineConfig/BackendConfig validation, engine plugins through entry points, lazy exports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from sagellm.control_plane import (
    BackendConfig,
    ControlPlaneManager,
    EngineConfig,
    LocalEngine,
    RemoteEngine,
    SubprocessEngine,
    create_engine,
    engine_plugins,
)
from tests.control_plane.conftest import run


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(kind="remote"), "needs url"),
        (dict(url="ftp://x"), "url = 'ftp://x'"),
        (dict(dtype="int3"), "dtype = 'int3'"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(kv_cache_memory_gb=-1), "kv_cache_memory_gb"),
        (dict(block_size=0), "block_size"),
        (dict(modle="x"), "modle"),
        (dict(model_name=" "), "model_name"),
    ],
)
def test_engine_config_rejects_bad_values(fields, match):
    with pytest.raises(ValidationError, match=match):
        EngineConfig(**fields)


def test_served_names_and_backend(tmp_path):
    assert EngineConfig().served_name() == "SmolLM2-135M-Instruct"
    assert (
        EngineConfig(model="Qwen/Qwen2.5-0.5B-Instruct").served_name()
        == "Qwen/Qwen2.5-0.5B-Instruct"
    )
    gguf = tmp_path / "m.Q4_0.gguf"
    gguf.write_bytes(b"")
    assert EngineConfig(model=str(gguf)).served_name() == "m.Q4_0"
    assert EngineConfig(model=str(gguf), model_name="x").served_name() == "x"
    assert BackendConfig(kind="cuda", device_ids=[1]).runtime_device() == "cuda:1"
    with pytest.raises(ValidationError, match="device_ids"):
        BackendConfig(device_ids=[-1])
    with pytest.raises(ValueError, match="backend kind = 'ascend'"):
        LocalEngine(EngineConfig(), BackendConfig(kind="ascend"))


def test_builtin_engine_kinds():
    kinds = engine_plugins()
    assert {"native", "remote", "subprocess"} <= set(kinds)
    assert isinstance(create_engine(EngineConfig()), LocalEngine)
    assert isinstance(create_engine(EngineConfig(kind="remote", url="http://h:1")), RemoteEngine)
    assert isinstance(create_engine(EngineConfig(kind="subprocess")), SubprocessEngine)
    with pytest.raises(ValueError, match="engine kind = 'warp' is unknown"):
        create_engine(EngineConfig(kind="warp"))
    with pytest.raises(ValueError, match="already in use"):
        ControlPlaneManager(
            engine_configs=[EngineConfig(engine_id="x"), EngineConfig(engine_id="x")]
        )
    with pytest.raises(ValueError, match="routing = 'fastest'"):
        ControlPlaneManager(engine_configs=[], routing="fastest")


def test_engine_plugin_from_an_entry_point(tmp_path, monkeypatch, engine_config):
    """A package installed on sys.path with a `sagellm.engines` entry point adds an engine kind."""
    (tmp_path / "cp_echo_plugin.py").write_text(
        textwrap.dedent(
            """
            from sagellm.control_plane import LocalEngine

            class EchoEngine(LocalEngine):
                kind = "echo"

            def make(config, backend):
                return EchoEngine(config, backend)
            """
        )
    )
    dist = tmp_path / "cp_echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cp-echo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sagellm.engines]\necho = cp_echo_plugin:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert engine_plugins()["echo"] == "cp_echo_plugin:make"

    async def main():
        async with ControlPlaneManager(engine_configs=[engine_config(kind="echo")]) as cp:
            assert cp.engines()[0].kind == "echo"
            r = await cp.execute_request(prompt="plugin", max_tokens=3, ignore_eos=True)
            assert len(r.output_tokens) == 3

    run(main())


def test_import_sagellm_stays_light():
    code = (
        "import sys, sagellm; assert 'sagellm.control_plane' not in sys.modules; "
        "from sagellm import ControlPlaneManager, EngineConfig, BackendConfig; "
        "assert ControlPlaneManager.__module__ == 'sagellm.control_plane.manager'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
