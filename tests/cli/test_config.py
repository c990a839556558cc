"""Settings: config file < SAGELLM_* env < flags, one-line errors naming key and source, and the
`sage-llm config show|path|init` commands."""

from __future__ import annotations

import json

import pytest
import yaml

from sagellm.cli.main import main
from sagellm.cli.settings import TEMPLATE, Settings, SettingsError, load_settings


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("SAGELLM_CONFIG", str(path))
    for var in ("SAGELLM_PORT", "SAGELLM_MODEL", "SAGELLM_API_KEY", "SAGELLM_DTYPE"):
        monkeypatch.delenv(var, raising=False)
    return path


def test_precedence_file_env_flags(cfg):
    cfg.write_text("port: 8100\nmodel: from-file\ndtype: bfloat16\ngateway:\n  port: 9100\n")
    env = {
        "SAGELLM_PORT": "8200",
        "SAGELLM_API_KEY": "sk-env",
        "SAGELLM_GATEWAY_ROUTING": "round_robin",
    }
    s, src = load_settings({"port": 8300, "model": None}, path=cfg, environ=env)
    assert (s.port, s.model, s.dtype, s.api_key) == (8300, "from-file", "bfloat16", "sk-env")
    assert (s.gateway.port, s.gateway.routing) == (9100, "round_robin")
    assert src["port"] == "flag --port"
    assert src["model"] == f"config file {cfg}"
    assert src["api_key"] == "environment variable SAGELLM_API_KEY"
    s, src = load_settings({}, path=cfg, environ=env)
    assert s.port == 8200 and src["port"] == "environment variable SAGELLM_PORT"
    s, _ = load_settings({}, path=cfg, environ={})
    assert s.port == 8100
    # no file at all: the defaults
    s, src = load_settings({}, path=cfg.parent / "absent.yaml", environ={})
    assert s == Settings() and src == {}


def test_env_lists_and_unrelated_variables(cfg):
    env = {
        "SAGELLM_GATEWAY_ENGINES": "http://a:8001, http://b:8002 http://c:8003",
        "SAGELLM_CPU_ISA": "avx2",  # another part of sageLLM reads it: not a setting, no error
        "SAGELLM_MAX_NUM_SEQS": "8",
    }
    s, _ = load_settings({}, path=cfg, environ=env)
    assert s.gateway.engines == ["http://a:8001", "http://b:8002", "http://c:8003"]
    assert s.max_num_seqs == 8


@pytest.mark.parametrize(
    "file_text, env, flags, expected",
    [
        ("port: 99999\n", {}, {}, "port = 99999 (from config file"),
        (
            "",
            {"SAGELLM_PORT": "eighty"},
            {},
            "port = 'eighty' (from environment variable SAGELLM_PORT)",
        ),
        (
            "",
            {"SAGELLM_DTYPE": "fp8"},
            {},
            "dtype = 'fp8' (from environment variable SAGELLM_DTYPE)",
        ),
        ("", {}, {"max_num_seqs": 0}, "max_num_seqs = 0 (from flag --max-num-seqs)"),
        ("", {}, {"kv_cache_memory_gb": -1.0}, "kv_cache_memory_gb = -1.0 (from flag"),
        ("gateway:\n  routing: random\n", {}, {}, "gateway.routing = 'random' (from config file"),
        ("prot: 8000\n", {}, {}, "unknown key 'prot' in config file"),
        ("port: [1\n", {}, {}, "is not valid YAML"),
        ("- a\n- b\n", {}, {}, "must hold a mapping"),
    ],
)
def test_invalid_values_name_key_and_source(cfg, file_text, env, flags, expected):
    cfg.write_text(file_text)
    with pytest.raises(SettingsError) as e:
        load_settings(flags, path=cfg, environ=env)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_template_is_valid_and_holds_the_defaults():
    data = yaml.safe_load(TEMPLATE)
    assert Settings.model_validate(data) == Settings()
    # every key is documented in the template
    assert set(data) == set(Settings.model_fields)
    assert set(data["gateway"]) == set(Settings().gateway.model_dump())


def test_config_commands(cfg, capsys):
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(cfg)
    assert main(["config", "init"]) == 0
    assert cfg.read_text() == TEMPLATE
    capsys.readouterr()
    assert main(["config", "init"]) == 1  # never overwrites without --force
    assert "exists" in capsys.readouterr().err
    cfg.write_text("port: 8123\n")
    assert main(["config", "init", "--force"]) == 0
    assert cfg.read_text() == TEMPLATE

    cfg.write_text("port: 8123\n")
    capsys.readouterr()
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert f"port: 8123  # config file {cfg}" in out
    assert main(["config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["settings"]["port"] == 8123 and shown["sources"] == {"port": f"config file {cfg}"}


def test_bad_config_stops_serve_with_one_line(cfg, capsys):
    cfg.write_text("dtype: int3\n")
    assert main(["serve"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype = 'int3'" in err[0] and str(cfg) in err[0]
    assert main(["config", "show"]) == 1
