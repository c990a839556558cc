"""--kv-cache-dtype from the command line, the environment and the config file down to the engine
core's EngineConfig, and `sage-llm run` with a quantized KV cache on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest

from sagellm.cli.serve import serve_configs
from sagellm.cli.settings import SettingsError, load_settings
from sagellm.control_plane.subprocess_engine import SubprocessEngine
from tests.cli.test_serve import cli_env, run_cli
from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3", "auto"])
def test_flag_reaches_the_runtime_config(kv, tmp_path):
    settings, sources = load_settings(
        {"kv_cache_dtype": kv}, path=tmp_path / "none.yaml", environ={}
    )
    assert sources["kv_cache_dtype"] == "flag --kv-cache-dtype"
    _, engine = serve_configs(settings)
    assert engine.kv_cache_dtype == kv
    assert engine.runtime_config().kv_cache_dtype == kv


def test_environment_and_bad_values(tmp_path):
    settings, _ = load_settings(
        path=tmp_path / "none.yaml", environ={"SAGELLM_KV_CACHE_DTYPE": "int8"}
    )
    assert settings.kv_cache_dtype == "int8"
    with pytest.raises(SettingsError, match="kv_cache_dtype.*SAGELLM_KV_CACHE_DTYPE"):
        load_settings(path=tmp_path / "none.yaml", environ={"SAGELLM_KV_CACHE_DTYPE": "fp16"})


def test_subprocess_engine_passes_it_on(tmp_path):
    from sagellm.control_plane.config import BackendConfig, EngineConfig

    eng = SubprocessEngine(
        EngineConfig(kind="subprocess", kv_cache_dtype="fp8_e4m3"), BackendConfig()
    )
    assert eng.environment()["SAGELLM_KV_CACHE_DTYPE"] == "fp8_e4m3"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kvq-cli") / "tiny-llama"
    return write_tiny_checkpoint("llama", folder, load_reference_tokenizer())


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3"])
def test_run_with_a_quantized_kv_cache(tiny, kv):
    r = run_cli(
        "run",
        "-m",
        str(tiny),
        "-p",
        "Hello",
        "--raw",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
        "--threads",
        "1",
        "--kv-cache-dtype",
        kv,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["output_tokens"] == 4


def test_run_refuses_an_unknown_kv_dtype():
    r = run_cli("run", "-p", "x", "--kv-cache-dtype", "fp16", env=cli_env())
    assert r.returncode == 2 and "invalid choice: 'fp16'" in r.stderr
    assert "Traceback" not in r.stderr
