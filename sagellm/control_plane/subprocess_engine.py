"""`SubprocessEngine`: an engine-only server that the control plane spawns and owns.

`python -m sagellm.cli.main serve --engine-only --host 127.0.0.1 --port P --model M`, reached
through a RemoteEngine. A crash of the engine takes down that process only; restart() respawns it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from sagellm.control_plane.config import BackendConfig, EngineConfig
from sagellm.control_plane.handle import (
    EngineHandle,
    EngineLoad,
    EngineState,
    StreamItem,
    default_engine_id,
)
from sagellm.control_plane.remote_engine import RemoteEngine
from sagellm.distributed.group import free_port
from sagellm.protocol import Request

log = logging.getLogger("sagellm.control_plane")

# Settings of `sage-llm serve` that the child must take from us, not from the parent's
# environment (SAGELLM_<KEY>, read by the CLI's settings loader).
_SETTINGS_ENV = [
    "MODEL",
    "MODEL_NAME",
    "ENGINE_ID",
    "ENGINE_KIND",
    "BACKEND",
    "DEVICE",
    "HOST",
    "PORT",
    "API_KEY",
    "DTYPE",
    "MAX_MODEL_LEN",
    "MAX_NUM_SEQS",
    "MAX_NUM_BATCHED_TOKENS",
    "KV_CACHE_MEMORY_GB",
    "KV_CACHE_DTYPE",
    "QUANTIZATION",
    "TENSOR_PARALLEL_SIZE",
    "ENABLE_PREFIX_CACHING",
    "NUM_THREADS",
    "MAX_CONCURRENT",
    "MAX_QUEUE",
    "REQUEST_TIMEOUT_S",
]


class SubprocessEngine(EngineHandle):
    kind = "subprocess"

    def __init__(
        self,
        config: EngineConfig | None = None,
        backend: BackendConfig | None = None,
        *,
        start_timeout_s: float = 300.0,
        host: str = "127.0.0.1",
    ):
        self.config = config or EngineConfig(kind="subprocess")
        self.backend = backend or BackendConfig()
        self.engine_id = self.config.engine_id or default_engine_id("subprocess")
        self.model = self.config.served_name()
        self.state = EngineState.STARTING
        self.start_timeout_s, self.host = start_timeout_s, host
        self.process: subprocess.Popen | None = None
        self.remote: RemoteEngine | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the engine)
            prefix=f"sagellm-{self.engine_id}-", suffix=".log", delete=False
        )
        self.log_path = self._log.name

    # -- the child process ---------------------------------------------------------------------
    def command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "sagellm.cli.main", "serve", "--engine-only"]
        cmd += ["--host", self.host, "--port", str(port)]
        if self.config.model:
            cmd += ["--model", self.config.model]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not _is_setting(k)}
        env["SAGELLM_CONFIG"] = os.devnull  # the user's config file must not reconfigure it
        c, b = self.config, self.backend
        values = {
            "MODEL_NAME": self.model,
            "ENGINE_ID": self.engine_id,
            "BACKEND": b.kind,
            "DEVICE": b.runtime_device() if b.kind in ("auto", "cpu", "cuda") else b.device,
            "DTYPE": _canonical_dtype(c.dtype),
            "MAX_MODEL_LEN": c.max_model_len,
            "MAX_NUM_SEQS": c.max_num_seqs,
            "MAX_NUM_BATCHED_TOKENS": c.max_num_batched_tokens,
            "KV_CACHE_MEMORY_GB": c.kv_cache_memory_gb,
            "KV_CACHE_DTYPE": c.kv_cache_dtype,
            "QUANTIZATION": c.quantization,
            "TENSOR_PARALLEL_SIZE": c.tensor_parallel_size,
            "ENABLE_PREFIX_CACHING": "true" if c.enable_prefix_caching else "false",
            "NUM_THREADS": c.num_threads,
        }
        for key, value in values.items():
            if value is not None and value != "auto":
                env[f"SAGELLM_{key}"] = str(value)
        return env

    def _spawn(self) -> None:
        port = free_port(self.host)
        self._log.write(f"--- {time.strftime('%H:%M:%S')} starting on port {port}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            self.command(port),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        cfg = EngineConfig(
            kind="remote",
            url=f"http://{self.host}:{port}",
            engine_id=self.engine_id,
            model_name=self.model,
        )
        self.remote = RemoteEngine(cfg, start_timeout_s=self.start_timeout_s)
        self.remote._wait_between_probes = self._check_alive_then_wait  # type: ignore[method-assign]

    async def _check_alive_then_wait(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"engine {self.engine_id}: the engine-only server exited with code "
                f"{self.process.returncode} while starting:\n{self.log_tail()}"
            )
        await asyncio.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    async def _terminate(self, timeout_s: float) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # uvicorn drains, then exits
        try:
            await asyncio.to_thread(proc.wait, max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.state = EngineState.STARTING
        self._spawn()
        try:
            await self.remote.start()
        except BaseException:
            await self._terminate(0)
            raise
        self.state = EngineState.READY

    async def stop(self, drain_timeout_s: float = 30) -> None:
        self.state = EngineState.STOPPED
        t0 = time.monotonic()
        if self.remote is not None:
            await self.remote.stop(drain_timeout_s)
        await self._terminate(max(0.0, drain_timeout_s - (time.monotonic() - t0)) + 5.0)

    async def restart(self) -> None:
        if self.remote is not None:
            await self.remote.stop(drain_timeout_s=0)
        await self._terminate(5.0)
        await self.start()

    async def health(self) -> bool:
        if self.process is None or self.process.poll() is not None or self.remote is None:
            return False
        return await self.remote.health()

    # -- delegated -----------------------------------------------------------------------------
    def load(self) -> EngineLoad:
        return self.remote.load() if self.remote is not None else EngineLoad()

    def info(self) -> dict[str, Any]:
        base = self.remote.info() if self.remote is not None else {}
        pid = self.process.pid if self.process is not None else None
        return {
            **base,
            "kind": self.kind,
            "state": self.state.value,
            "pid": pid,
            "log": self.log_path,
            "engine_id": self.engine_id,
            "model": self.model,
        }

    def tokenizer(self):
        return self.remote.tokenizer() if self.remote is not None else None

    async def generate(self, request: Request) -> AsyncIterator[StreamItem]:
        from sagellm.protocol import ErrorCode, ProtocolError

        remote = self.remote
        if self.state != EngineState.READY or remote is None:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"engine {self.engine_id} is {self.state.value.lower()}"
            )
        events = remote.generate(request)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # now, not at garbage collection: it aborts the request


def _is_setting(name: str) -> bool:
    if not name.startswith("SAGELLM_"):
        return False
    key = name[len("SAGELLM_") :]
    return key in _SETTINGS_ENV or key.startswith("GATEWAY_") or key == "CONFIG"


def _canonical_dtype(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(
        dtype, dtype
    )
