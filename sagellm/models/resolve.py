"""Where a model comes from: a local path, the Hugging Face cache, the ModelScope cache, the Hub.

The offline places are tried first, so a cached model never touches the network. Nothing found:
ModelNotFoundError listing every place tried and why each failed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sagellm.models.errors import ModelNotFoundError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
_TRUE = {"1", "true", "yes", "on"}
# What a Hub download fetches: config, tokenizer files and safetensors weights; .bin weights only
# in a second pass when the repo has no safetensors (many repos carry both).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


@dataclass(frozen=True)
class ResolvedModel:
    kind: Literal["hf", "gguf"]  # hf: a folder with config.json; gguf: one .gguf file
    path: Path
    source: str  # where it was found, for messages: "local", "huggingface cache", ...


def resolve_model(model: str, revision: str | None = None) -> ResolvedModel:
    """Find `model` (a path, or an "org/name" id); ModelNotFoundError listing what was tried."""
    tried: list[str] = []
    path = Path(model).expanduser()
    if path.exists():
        found = _local(path, tried)
        if found:
            return ResolvedModel(found[0], found[1], "local")
    else:
        tried.append(f"local path {path}: does not exist")
    if _REPO_ID.fullmatch(model) and not path.exists():
        for finder in (_hf_cache, _modelscope_cache, _hub):
            found = finder(model, revision, tried)
            if found:
                return found
    else:
        tried.append(
            f"{model!r} is not a Hugging Face id of the form org/name: caches and Hub skipped"
        )
    lines = "\n  - ".join(tried)
    raise ModelNotFoundError(f"model {model!r} not found; tried:\n  - {lines}")


def _local(path: Path, tried: list[str]) -> tuple[str, Path] | None:
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path.resolve()
        if (path.parent / "config.json").is_file():  # e.g. a model.safetensors or config.json
            return "hf", path.parent.resolve()
        tried.append(
            f"local file {path}: neither a .gguf file nor inside a folder with config.json"
        )
        return None
    found = _in_folder(path)
    if isinstance(found, str):
        tried.append(f"local folder {path}: {found}")
        return None
    return found


def _in_folder(folder: Path) -> tuple[str, Path] | str:
    """("hf" | "gguf", path) for a model folder, or why it is not one."""
    if (folder / "config.json").is_file():
        return "hf", folder.resolve()
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0].resolve()
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        return f"holds several .gguf files ({names}); pass the file itself"
    return "has neither config.json nor a .gguf file"


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def modelscope_cache() -> Path:
    if os.environ.get("MODELSCOPE_CACHE"):
        return Path(os.environ["MODELSCOPE_CACHE"]).expanduser()
    return Path("~/.cache/modelscope/hub").expanduser()


def _hf_cache(model: str, revision: str | None, tried: list[str]) -> ResolvedModel | None:
    repo = hf_hub_cache() / f"models--{model.replace('/', '--')}"
    where = f"Hugging Face cache {repo}"
    if not repo.is_dir():
        tried.append(f"{where}: not there")
        return None
    rev = revision or "main"
    ref = repo / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        if revision is not None or not snapshots:
            tried.append(f"{where}: no snapshot for revision {rev!r}")
            return None
        snapshot = snapshots[-1]  # no refs/main (copied cache): the newest snapshot
    found = _in_folder(snapshot)
    if isinstance(found, str):
        tried.append(f"{where}: snapshot {snapshot.name} {found}")
        return None
    return ResolvedModel(found[0], found[1], "huggingface cache")


def _modelscope_cache(model: str, revision: str | None, tried: list[str]) -> ResolvedModel | None:
    org, name = model.split("/", 1)
    root = modelscope_cache()
    # ModelScope writes "." in names as "___" in its folder names; newer versions add "models/"
    names = {name, name.replace(".", "___")}
    folders = [root / sub / org / n for sub in ("", "models") for n in sorted(names)]
    for folder in folders:
        if folder.is_dir():
            found = _in_folder(folder)
            if isinstance(found, str):
                tried.append(f"ModelScope cache {folder}: {found}")
                continue
            return ResolvedModel(found[0], found[1], "modelscope cache")
    tried.append(f"ModelScope cache {root / org / name}: not there")
    return None


def _hub(model: str, revision: str | None, tried: list[str]) -> ResolvedModel | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            tried.append(f"Hugging Face Hub: skipped, {var}={os.environ[var]}")
            return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        tried.append("Hugging Face Hub: huggingface_hub is not installed")
        return None
    try:
        folder = snapshot_download(
            model, revision=revision, allow_patterns=_HUB_PATTERNS, etag_timeout=10
        )
        if not any(Path(folder).glob("*.safetensors")):
            patterns = [*_HUB_PATTERNS, "*.bin"]
            folder = snapshot_download(
                model, revision=revision, allow_patterns=patterns, etag_timeout=10
            )
    except Exception as e:  # network, auth, missing repo: all mean "not from the Hub"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        tried.append(f"Hugging Face Hub {model}: {type(e).__name__}: {reason}")
        return None
    found = _in_folder(Path(folder))
    if isinstance(found, str):
        tried.append(f"Hugging Face Hub {model}: download {found}")
        return None
    return ResolvedModel(found[0], found[1], "huggingface hub")
