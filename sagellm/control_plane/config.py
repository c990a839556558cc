"""What the control plane runs: which hardware (BackendConfig) and which engines (EngineConfig).

Validated with pydantic at the edge (config file, flags, Python callers), so a typo is a clear
error naming the field, not a failure deep inside an engine thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")


class BackendConfig(BaseModel):
    """kind: auto | cpu | cuda | ascend | a backend plugin name. device: e.g. "cuda:1"; device_ids:
    the devices an engine may use (one engine uses the first today)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "auto"
    device: str | None = None
    device_ids: list[int] | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("kind must be a non-empty backend name (auto, cpu, cuda, ascend, ...)")
        return v.strip().lower()

    @field_validator("device_ids")
    @classmethod
    def _device_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("device_ids = [] is invalid: give at least one id, or null")
            for i, d in enumerate(v):
                if d < 0:
                    raise ValueError(f"device_ids[{i}] = {d} is invalid: expected an id >= 0")
        return v

    def runtime_device(self) -> str:
        """The engine core's `device` string for this backend ("auto", "cpu", "cuda:N")."""
        if self.device:
            return self.device
        if self.kind in ("auto", "cpu"):
            return self.kind
        if self.kind == "cuda":
            return f"cuda:{self.device_ids[0]}" if self.device_ids else "cuda"
        raise ValueError(
            f"backend kind = {self.kind!r} is not supported by the native engine: "
            "expected auto, cpu or cuda (other backends come as engine plugins)"
        )


class EngineConfig(BaseModel):
    """One engine. kind: the engine plugin ("native" in process, "remote" at `url`, "subprocess"
    an engine-only server the control plane spawns). model: a path, Hugging Face id or None for
    the default model. model_name: the name clients use (default: the model's file or folder
    name, or the Hugging Face id as given)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: str = "native"
    model: str | None = None
    model_name: str | None = None
    engine_id: str | None = None
    url: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=64, gt=0)
    max_num_batched_tokens: int = Field(default=1024, gt=0)
    kv_cache_memory_gb: float | None = Field(default=None, gt=0)
    kv_cache_dtype: Literal["auto", "int8", "fp8_e4m3"] = "auto"
    quantization: Literal["none", "int8", "int4", "fp8"] = "none"
    tensor_parallel_size: int = Field(default=1, ge=1)
    block_size: int = Field(default=16, ge=1, le=1024)
    enable_prefix_caching: bool = True
    num_threads: int | None = Field(default=None, gt=0)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("kind must name an engine plugin (native, remote, subprocess, ...)")
        return v.strip()

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in _DTYPES:
            raise ValueError(
                f"dtype = {v!r} is invalid: expected auto, float32, bfloat16 or float16"
            )
        return v

    @field_validator("model_name", "engine_id", "model")
    @classmethod
    def _non_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty string or null")
        return v

    @model_validator(mode="after")
    def _url(self) -> EngineConfig:
        if self.kind == "remote" and not self.url:
            raise ValueError("kind = 'remote' needs url (e.g. http://127.0.0.1:8001)")
        if self.url is not None:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url = {self.url!r} is invalid: expected http://host:port")
            self.url = self.url.rstrip("/")
        return self

    def served_name(self) -> str:
        """The model name clients send: model_name, else derived from `model`."""
        if self.model_name:
            return self.model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        path = Path(self.model).expanduser()
        if path.exists():
            name = path.resolve().name
            return name[: -len(".gguf")] if name.endswith(".gguf") else name
        return self.model  # a Hugging Face id: keep "org/name", which is what clients send

    def runtime_config(self, backend: BackendConfig | None = None, **overrides):
        """The engine core's EngineConfig for a native engine on `backend`."""
        from sagellm.runtime.config import EngineConfig as RuntimeConfig

        fields = dict(
            model=self.model,
            dtype=self.dtype,
            device=(backend or BackendConfig()).runtime_device(),
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            kv_cache_dtype=self.kv_cache_dtype,
            quantization=self.quantization,
            tensor_parallel_size=self.tensor_parallel_size,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            num_threads=self.num_threads,
            load_progress=False,
        )
        fields.update(overrides)
        return RuntimeConfig(**fields)
