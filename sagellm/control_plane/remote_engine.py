"""`RemoteEngine`: an engine-only server (`sage-llm serve --engine-only`) reached over HTTP.

The wire API (issue4_spec.md): GET /health, GET /v1/engine/info, GET /v1/engine/load, and
POST /v1/engine/generate answering with server-sent events, one protocol StreamEvent per `data:`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

try:
    import httpx
except ImportError:  # an optional dependency (isagellm[control-plane]); only remote engines need it
    httpx = None

from sagellm.control_plane.config import BackendConfig, EngineConfig
from sagellm.control_plane.handle import (
    EngineHandle,
    EngineLoad,
    EngineState,
    StreamItem,
    default_engine_id,
)
from sagellm.protocol import ErrorCode, ProtocolError, Request, StreamEnd, parse_stream_event

log = logging.getLogger("sagellm.control_plane")


class RemoteEngine(EngineHandle):
    kind = "remote"

    def __init__(
        self,
        config: EngineConfig | str,
        backend: BackendConfig | None = None,
        *,
        start_timeout_s: float = 120.0,
        probe_timeout_s: float = 5.0,
    ):
        if httpx is None:
            raise ImportError("remote engines need httpx: pip install 'isagellm[control-plane]'")
        if isinstance(config, str):
            config = EngineConfig(kind="remote", url=config)
        if not config.url:
            raise ValueError(f"a remote engine needs url (engine_id={config.engine_id!r})")
        self.config, self.url = config, config.url
        self.engine_id = config.engine_id or default_engine_id("remote")
        # Until the server says which model it serves, the configured name stands in.
        self.model = config.model_name or (config.served_name() if config.model else "")
        self.state = EngineState.STARTING
        self.start_timeout_s, self.probe_timeout_s = start_timeout_s, probe_timeout_s
        self._client: httpx.AsyncClient | None = None
        self._info: dict[str, Any] = {}
        self._remote_load = EngineLoad()
        self._in_flight = 0
        self._tokenizer = None
        self._tokenizer_tried = False

    # -- lifecycle -----------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # No read timeout: a long generation streams for as long as it runs.
            self._client = httpx.AsyncClient(
                base_url=self.url, timeout=httpx.Timeout(None, connect=self.probe_timeout_s)
            )
        return self._client

    async def start(self) -> None:
        self.state = EngineState.STARTING
        deadline = time.monotonic() + self.start_timeout_s
        while not await self._probe():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"engine {self.engine_id}: no healthy engine-only server at {self.url} "
                    f"after {self.start_timeout_s:.0f} s"
                )
            await self._wait_between_probes()
        await self._refresh_info()
        self.state = EngineState.READY

    async def _wait_between_probes(self) -> None:
        await asyncio.sleep(0.2)

    async def stop(self, drain_timeout_s: float = 30) -> None:
        # The server is not ours to stop; drain what this handle sent, then close the connections.
        self.state = EngineState.STOPPED
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def restart(self) -> None:
        """A server we do not own cannot be rebuilt: drop the connections and probe it again."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if not await self._probe():
            raise RuntimeError(f"engine {self.engine_id}: {self.url} is still not healthy")
        await self._refresh_info()
        self.state = EngineState.READY

    async def _probe(self) -> bool:
        try:
            r = await self._http().get("/health", timeout=self.probe_timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def _refresh_info(self) -> None:
        r = await self._http().get("/v1/engine/info", timeout=self.probe_timeout_s)
        r.raise_for_status()
        self._info = r.json()
        if not self.config.model_name and self._info.get("model"):
            self.model = self._info["model"]

    async def health(self) -> bool:
        if self.state == EngineState.STOPPED:
            return False
        try:
            r = await self._http().get("/v1/engine/load", timeout=self.probe_timeout_s)
            if r.status_code == 200:
                self._remote_load = EngineLoad.from_dict(r.json())
            return await self._probe()
        except (httpx.HTTPError, ValueError):
            return False

    # -- introspection -------------------------------------------------------------------------
    def load(self) -> EngineLoad:
        # running/waiting/kv_usage as of the last health check; in_flight is current.
        r = self._remote_load
        return EngineLoad(r.running, r.waiting, r.kv_usage, self._in_flight)

    def info(self) -> dict[str, Any]:
        return {
            **self._info,
            "remote_engine_id": self._info.get("engine_id"),
            "engine_id": self.engine_id,
            "model": self.model,
            "kind": self.kind,
            "url": self.url,
            "state": self.state.value,
        }

    def tokenizer(self):
        """The server's tokenizer when its model files are readable from here (same machine or a
        shared disk), so a gateway can apply chat templates for a remote engine; else None."""
        if not self._tokenizer_tried and self._info:
            self._tokenizer_tried = True
            self._tokenizer = _tokenizer_from_info(self._info)
        return self._tokenizer

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, request: Request) -> AsyncIterator[StreamItem]:
        if self.state != EngineState.READY:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"engine {self.engine_id} is {self.state.value.lower()}"
            )
        self._in_flight += 1
        ended = 0
        try:
            async with self._http().stream(
                "POST", "/v1/engine/generate", json=request.model_dump(mode="json")
            ) as resp:
                if resp.status_code != 200:
                    raise _refusal(resp.status_code, await resp.aread(), self.engine_id)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if not data or data == "[DONE]":
                        continue
                    event = parse_stream_event(data)
                    if isinstance(event, StreamEnd):
                        if event.finish_reason == "error":
                            err = event.error
                            code = err.code if err else ErrorCode.UNAVAILABLE
                            msg = err.message if err else "the engine reported an error"
                            raise ProtocolError(code, msg, err.details if err else None)
                        ended += 1
                    # One id space for routing and logs: ours, not the server's.
                    event.engine_id = self.engine_id
                    yield event
                    if ended == request.n:
                        return
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"engine {self.engine_id} at {self.url} closed the stream before the end",
            )
        except httpx.HTTPError as e:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"engine {self.engine_id} at {self.url} failed: {type(e).__name__}",
            ) from None
        except ValueError as e:  # an event that does not parse: the server is not ours/healthy
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"engine {self.engine_id} sent a malformed event: {e}"
            ) from None
        finally:
            self._in_flight -= 1


def _refusal(status: int, body: bytes, engine_id: str) -> ProtocolError:
    """The server's `{"error": protocol.Error}` body as a ProtocolError."""
    try:
        err = json.loads(body)["error"]
        return ProtocolError(err["code"], err["message"], err.get("details"))
    except (ValueError, KeyError, TypeError):
        code = ErrorCode.UNAVAILABLE if status >= 500 else ErrorCode.INVALID_ARGUMENT
        return ProtocolError(code, f"engine {engine_id} answered HTTP {status}")


def _tokenizer_from_info(info: dict[str, Any]):
    from sagellm.models.tokenizer import Tokenizer

    source, eos = info.get("source"), info.get("eos_token_ids") or []
    if not source or not Path(source).exists():
        return None
    try:
        if info.get("format") == "gguf" and info.get("model_type"):
            return Tokenizer.from_gguf(source, info["model_type"], eos)
        return Tokenizer.from_folder(source, eos)
    except Exception as e:  # a tokenizer we cannot read only costs chat templates
        log.warning("cannot load the tokenizer of %s from %s: %s", info.get("model"), source, e)
        return None
