"""`sage-llm` settings: `~/.sage-llm/config.yaml` (or $SAGELLM_CONFIG) < `SAGELLM_*` environment
variables < command-line flags, validated by pydantic with one-line errors naming the key and
where its value came from.

Serving keys sit at the top level (`model`, `port`, ...); the gateway's own keys in a `gateway:`
section (env `SAGELLM_GATEWAY_PORT`, ...), so one file configures both commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "SAGELLM_"
CONFIG_ENV = "SAGELLM_CONFIG"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
KVCacheDtype = Literal["auto", "int8", "fp8_e4m3"]
Quantization = Literal["none", "int8", "int4", "fp8"]
Routing = Literal["round_robin", "least_loaded", "prefix_affinity"]


class GatewaySection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    engines: list[str] = Field(default_factory=list)
    routing: Routing = "least_loaded"

    @field_validator("engines", mode="before")
    @classmethod
    def _split(cls, v):
        # The environment gives one string: "http://a:8001, http://b:8001" or space separated.
        if isinstance(v, str):
            return [u for u in v.replace(",", " ").split() if u]
        return v


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    model_name: str | None = None
    engine_id: str | None = None
    engine_kind: str = "native"
    backend: str = "auto"
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: str | None = None
    dtype: Dtype = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=1024, ge=1)
    kv_cache_memory_gb: float | None = Field(default=None, gt=0)
    kv_cache_dtype: KVCacheDtype = "auto"
    quantization: Quantization = "none"
    tensor_parallel_size: int = Field(default=1, ge=1)
    enable_prefix_caching: bool = True
    num_threads: int | None = Field(default=None, ge=1)
    max_concurrent: int = Field(default=64, ge=1)
    max_queue: int = Field(default=256, ge=0)
    request_timeout_s: float = Field(default=600, gt=0)
    gateway: GatewaySection = Field(default_factory=GatewaySection)


class SettingsError(ValueError):
    """A bad config value: the message names the key, the value and its source."""


def config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    return Path(env).expanduser() if env else Path.home() / ".sage-llm" / "config.yaml"


def _read_file(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SettingsError(f"config file {path} is not valid YAML: {first}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key == "gateway" and not prefix and isinstance(value, dict):
            out.update(_flatten(value, "gateway."))
        else:
            out[name] = value
    return out


def _env_keys() -> dict[str, str]:
    # Only names that map to a setting; other SAGELLM_* variables (SAGELLM_CPU_ISA, the build's
    # SAGELLM_CUDA, SAGELLM_CONFIG) belong to other parts of sageLLM.
    keys = {f"{ENV_PREFIX}{k.upper()}": k for k in Settings.model_fields if k != "gateway"}
    keys.update(
        {f"{ENV_PREFIX}GATEWAY_{k.upper()}": f"gateway.{k}" for k in GatewaySection.model_fields}
    )
    return keys


def _read_env(environ: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {key: (environ[var], var) for var, key in _env_keys().items() if var in environ}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("gateway."):
            out.setdefault("gateway", {})[key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def load_settings(
    flags: dict[str, Any] | None = None,
    *,
    path: Path | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """The effective settings and, per key that was set anywhere, where it came from
    ("file /path", "env SAGELLM_PORT", "flag --port"). `flags` maps keys (`gateway.port` for the
    gateway section) to values; None values are "not given"."""
    path = path or config_path()
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in _flatten(_read_file(path)).items():
        values[key], sources[key] = value, f"config file {path}"
    for key, (value, var) in _read_env(environ).items():
        values[key], sources[key] = value, f"environment variable {var}"
    for key, value in (flags or {}).items():
        if value is not None:
            values[key], sources[key] = value, f"flag --{key.split('.')[-1].replace('_', '-')}"
    try:
        return Settings.model_validate(_nest(values)), sources
    except ValidationError as e:
        raise SettingsError(_describe(e, values, sources)) from None


def _describe(e: ValidationError, values: dict[str, Any], sources: dict[str, str]) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"config: unknown key {key!r} in {sources.get(key, 'the config')}"
    if key in values:
        return f"config: {key} = {values[key]!r} (from {sources[key]}) is invalid: {msg}"
    return f"config: {key} is invalid: {msg}"


TEMPLATE = """\
# sageLLM configuration (`sage-llm config init` wrote this file).
# Precedence: this file < SAGELLM_* environment variables < command-line flags.
# Every key is optional; the values below are the defaults. Env names: SAGELLM_<KEY> for the
# top-level keys (SAGELLM_PORT, SAGELLM_MODEL, SAGELLM_API_KEY, SAGELLM_DTYPE, ...) and
# SAGELLM_GATEWAY_<KEY> for the gateway section (SAGELLM_GATEWAY_PORT, ...).

# The model: a local directory, a .gguf file or a Hugging Face id; null = the default model
# (SmolLM2-135M-Instruct, shipped offline).
model: null
# The name clients send as "model" (default: the model's folder/file name).
model_name: null
engine_id: null
# Engine plugin (entry-point group sagellm.engines): native, or an installed plugin's name.
engine_kind: native
# Hardware backend: auto, cpu, cuda, ascend, or an installed plugin's name.
backend: auto
device: null

# `sage-llm serve`. 127.0.0.1 serves this machine only; 0.0.0.0 listens on every interface
# (set api_key when you do).
host: 127.0.0.1
port: 8000
# Clients must send "Authorization: Bearer <api_key>" on /v1/* when set.
api_key: null

# Engine sizing. dtype: auto, float32, bfloat16 or float16.
dtype: auto
max_model_len: null
max_num_seqs: 64
max_num_batched_tokens: 1024
# KV cache size in GiB; null sizes it from free memory.
kv_cache_memory_gb: null
# KV cache storage: auto (the model dtype), int8 or fp8_e4m3 (1 byte per value + a scale per
# token and head: about 2x (bf16) to 4x (fp32) the tokens in the same memory).
kv_cache_dtype: auto
# Quantize a dense checkpoint's weights at load: none, int8, int4 (groups of 128) or fp8 (CUDA).
# AWQ / GPTQ checkpoints are recognised without it; a GGUF file is already quantized.
quantization: none
# Split the model over N ranks (one process each; gloo on CPUs, NCCL on GPUs).
tensor_parallel_size: 1
enable_prefix_caching: true
num_threads: null

# Admission control: requests running at once, requests waiting (then 503), per-request limit.
max_concurrent: 64
max_queue: 256
request_timeout_s: 600

# `sage-llm gateway` in front of engine-only servers (`sage-llm serve --engine-only`).
gateway:
  host: 127.0.0.1
  port: 8080
  # e.g. [http://127.0.0.1:8001, http://127.0.0.1:8002]
  engines: []
  # round_robin, least_loaded or prefix_affinity
  routing: least_loaded
"""
