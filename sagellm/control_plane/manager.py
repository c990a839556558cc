"""`ControlPlaneManager`: several engines behind one request API, with routing and health.

    async with ControlPlaneManager(engine_configs=[EngineConfig(model="...")]) as cp:
        response = await cp.execute_request(prompt="Hello", max_tokens=32)

Every engine sits in a slot with its consecutive health failures and a `down` future. An engine
that fails `max_failures` checks in a row is marked DOWN: its future fires, which ends every
request still streaming from it with ProtocolError(UNAVAILABLE) even when the engine itself hangs;
then it is restarted (or, for a server we do not own, probed until it answers again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from sagellm.control_plane.config import BackendConfig, EngineConfig
from sagellm.control_plane.engines import create_engine
from sagellm.control_plane.handle import EngineHandle, EngineState, StreamItem
from sagellm.control_plane.routing import RoutingPolicy, make_policy
from sagellm.protocol import ErrorCode, ProtocolError, Request, Response, StreamEnd, StreamStart

log = logging.getLogger("sagellm.control_plane")

_END = object()


@dataclass
class _Slot:
    handle: EngineHandle
    failures: int = 0
    restarts: int = 0
    down: asyncio.Future | None = None
    task: asyncio.Task | None = None  # a start or restart in progress
    checking: bool = False
    next_restart_at: float = 0.0
    last_error: str | None = None
    attempts: int = 0  # restarts failed in a row

    def down_future(self) -> asyncio.Future:
        if self.down is None or self.down.done():
            self.down = asyncio.get_running_loop().create_future()
        return self.down


class ControlPlaneManager:
    def __init__(
        self,
        backend_config: BackendConfig | None = None,
        engine_configs: Sequence[EngineConfig] | None = None,
        routing: str | RoutingPolicy = "least_loaded",
        health_check_interval_s: float = 5.0,
        max_failures: int = 3,
        restart_engines: bool = True,
    ):
        if not health_check_interval_s > 0:
            raise ValueError(f"health_check_interval_s = {health_check_interval_s} must be > 0")
        if max_failures < 1:
            raise ValueError(f"max_failures = {max_failures} must be >= 1")
        self.backend_config = backend_config or BackendConfig()
        self.policy = make_policy(routing)
        self.health_check_interval_s = health_check_interval_s
        self.max_failures = max_failures
        self.restart_engines = restart_engines
        self._slots: dict[str, _Slot] = {}
        self._running = False
        self._health_task: asyncio.Task | None = None
        configs = [EngineConfig()] if engine_configs is None else list(engine_configs)
        for cfg in configs:
            if not isinstance(cfg, EngineConfig):
                raise TypeError(f"engine_configs holds a {type(cfg).__name__}, not EngineConfig")
            self.add_engine(create_engine(cfg, self.backend_config))

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        slots = list(self._slots.values())
        results = await asyncio.gather(
            *(s.handle.start() for s in slots if s.handle.state != EngineState.READY),
            return_exceptions=True,
        )
        failed = [
            (s, r)
            for s, r in zip([s for s in slots if s.handle.state != EngineState.READY], results)
            if isinstance(r, BaseException)
        ]
        if failed:
            await asyncio.gather(*(s.handle.stop(0) for s in slots), return_exceptions=True)
            slot, error = failed[0]
            raise RuntimeError(
                f"engine {slot.handle.engine_id} failed to start: {error}"
            ) from error
        self._running = True
        for s in slots:
            s.down_future()
        self._health_task = asyncio.create_task(self._health_loop(), name="sagellm-health")

    async def stop(self, drain_timeout_s: float = 30) -> None:
        """Refuse new requests, let running ones finish (up to drain_timeout_s), stop engines."""
        self._running = False
        tasks = [t for t in (self._health_task, *(s.task for s in self._slots.values())) if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._health_task = None
        results = await asyncio.gather(
            *(s.handle.stop(drain_timeout_s) for s in self._slots.values()),
            return_exceptions=True,
        )
        for slot, r in zip(self._slots.values(), results):
            if isinstance(r, BaseException):
                log.error("engine %s did not stop cleanly: %s", slot.handle.engine_id, r)

    async def __aenter__(self) -> ControlPlaneManager:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- engines -------------------------------------------------------------------------------
    def engines(self) -> list[EngineHandle]:
        return [s.handle for s in self._slots.values()]

    def models(self) -> list[str]:
        return sorted({s.handle.model for s in self._slots.values() if s.handle.model})

    def add_engine(self, handle: EngineHandle) -> None:
        """Register a handle; when the manager runs and the handle is not started, start it."""
        if not isinstance(handle, EngineHandle):
            raise TypeError(f"add_engine takes an EngineHandle, not {type(handle).__name__}")
        if handle.engine_id in self._slots:
            raise ValueError(f"engine_id = {handle.engine_id!r} is already in use")
        slot = self._slots[handle.engine_id] = _Slot(handle)
        if self._running:
            slot.down_future()
            if handle.state != EngineState.READY:
                slot.task = asyncio.create_task(self._start_added(slot))

    async def _start_added(self, slot: _Slot) -> None:
        try:
            await slot.handle.start()
        except Exception as e:
            slot.last_error = str(e)
            log.error("engine %s failed to start: %s", slot.handle.engine_id, e)
            slot.handle.state = EngineState.DOWN

    async def remove_engine(self, engine_id: str, drain_timeout_s: float = 30) -> None:
        slot = self._slots.pop(engine_id, None)
        if slot is None:
            raise ValueError(f"engine_id = {engine_id!r} is not registered")
        if slot.task is not None:
            slot.task.cancel()
            await asyncio.gather(slot.task, return_exceptions=True)
        await slot.handle.stop(drain_timeout_s)

    def tokenizer_for(self, model: str):
        handles = [s.handle for s in self._slots.values() if s.handle.model == model]
        handles.sort(key=lambda h: h.state != EngineState.READY)
        for h in handles:
            tok = h.tokenizer()
            if tok is not None:
                return tok
        return None

    def status(self) -> dict[str, Any]:
        return {
            "running": self._running,
            "routing": self.policy.name,
            "models": self.models(),
            "engines": [
                {
                    "engine_id": s.handle.engine_id,
                    "kind": s.handle.kind,
                    "model": s.handle.model,
                    "state": s.handle.state.value,
                    "failures": s.failures,
                    "restarts": s.restarts,
                    "last_error": s.last_error,
                    "load": s.handle.load().to_dict(),
                }
                for s in self._slots.values()
            ],
        }

    # -- requests ------------------------------------------------------------------------------
    async def execute_request(
        self,
        request: Request | None = None,
        *,
        prompt: str | list[int] | None = None,
        max_tokens: int = 16,
        model: str | None = None,
        **fields: Any,
    ) -> Response:
        """Run one request to the end. With n > 1 this is the first choice (stream_request
        gives every choice)."""
        request = self._request(request, prompt, max_tokens, model, fields)
        engine_id, end = None, None
        events = self.stream_request(request)
        try:
            async for event in events:
                if isinstance(event, StreamStart):
                    engine_id = event.engine_id
                elif isinstance(event, StreamEnd) and event.index == 0:
                    end = event
                    break  # other choices are not returned: stop computing them
        finally:
            await events.aclose()
        if end is None:
            raise ProtocolError(ErrorCode.INTERNAL, f"request {request.request_id} had no end")
        return Response(
            request_id=request.request_id,
            trace_id=request.trace_id,
            output_text=end.output_text,
            output_tokens=end.output_tokens,
            finish_reason=end.finish_reason,
            metrics=end.metrics,
            error=end.error,
            usage=end.usage,
            engine_id=end.engine_id or engine_id,
            index=0,
        )

    async def stream_request(
        self,
        request: Request | None = None,
        *,
        prompt: str | list[int] | None = None,
        max_tokens: int = 16,
        model: str | None = None,
        **fields: Any,
    ) -> AsyncIterator[StreamItem]:
        """Stream one request's events: StreamStart, StreamDeltas, a StreamEnd per choice.
        Refusals raise ProtocolError before the first event; closing early aborts it."""
        request = self._request(request, prompt, max_tokens, model, fields)
        tried: set[str] = set()
        while True:
            slot = self._route(request, tried)
            down = slot.down_future()
            events = slot.handle.generate(request)
            sent = False
            try:
                while True:
                    event = await self._next(events, down, slot)
                    if event is _END:
                        return
                    sent = True
                    yield event
            except ProtocolError as e:
                if e.code != ErrorCode.UNAVAILABLE:
                    raise
                self._suspect(slot)
                # Nothing was streamed yet: another engine can still serve it.
                tried.add(slot.handle.engine_id)
                if sent or not self._ready(request.model, tried):
                    raise
                log.warning(
                    "engine %s unavailable, retrying %s", slot.handle.engine_id, request.request_id
                )
            finally:
                await events.aclose()

    async def _next(self, events, down: asyncio.Future, slot: _Slot):
        nxt = asyncio.ensure_future(events.__anext__())
        try:
            await asyncio.wait({nxt, down}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we were cancelled: the pending step must not outlive us
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
            raise
        if nxt.done():
            try:
                return nxt.result()
            except StopAsyncIteration:
                return _END
        nxt.cancel()
        with contextlib.suppress(BaseException):
            await nxt
        raise ProtocolError(
            ErrorCode.UNAVAILABLE,
            f"engine {slot.handle.engine_id} went down mid-request: {down.result()}",
        )

    def _request(self, request, prompt, max_tokens, model, fields) -> Request:
        if request is not None:
            if prompt is not None or model is not None or fields:
                raise TypeError("pass either a Request or keyword fields, not both")
            if not isinstance(request, Request):
                raise TypeError(f"request must be a protocol Request, not {type(request).__name__}")
            return request
        if model is None:
            models = self.models()
            if len(models) != 1:
                raise ProtocolError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"model is required: this control plane serves {', '.join(models) or 'none'}",
                )
            model = models[0]
        if prompt is None:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, "prompt is required")
        try:
            return Request(model=model, prompt=prompt, max_tokens=max_tokens, **fields)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "request"
            msg = f"{loc} = {err.get('input')!r} is invalid: {err['msg']}"
            if err["type"] == "extra_forbidden":
                msg = f"{loc} is not a request field"
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, msg) from None

    def _ready(self, model: str, exclude: set[str]) -> list[EngineHandle]:
        return [
            s.handle
            for s in self._slots.values()
            if s.handle.model == model
            and s.handle.state == EngineState.READY
            and s.handle.engine_id not in exclude
        ]

    def _route(self, request: Request, exclude: set[str]) -> _Slot:
        if not self._running:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the control plane is not running")
        if not any(s.handle.model == request.model for s in self._slots.values()):
            raise ProtocolError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {request.model!r} is not served here; models: "
                f"{', '.join(self.models()) or 'none'}",
            )
        ready = self._ready(request.model, exclude)
        if not ready:
            states = ", ".join(
                f"{s.handle.engine_id} {s.handle.state.value}"
                for s in self._slots.values()
                if s.handle.model == request.model
            )
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"no healthy engine serves {request.model!r} ({states})"
            )
        return self._slots[self.policy.choose(ready, request).engine_id]

    # -- health --------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.health_check_interval_s)
            await asyncio.gather(*(self._check(s) for s in list(self._slots.values())))

    def _suspect(self, slot: _Slot) -> None:
        """A request saw the engine fail: check it now rather than at the next tick."""
        if self._running and slot.handle.state == EngineState.READY:
            asyncio.get_running_loop().create_task(self._check(slot))

    async def _check(self, slot: _Slot) -> None:
        h = slot.handle
        if slot.checking or (slot.task and not slot.task.done()) or h.state == EngineState.STOPPED:
            return
        slot.checking = True
        try:
            try:
                ok = await asyncio.wait_for(h.health(), max(2.0, self.health_check_interval_s))
            except Exception as e:
                ok, slot.last_error = False, f"health check failed: {e!r}"
            if ok:
                slot.failures = 0
                if h.state == EngineState.DOWN:  # a server we do not own came back by itself
                    self._recover(slot)
                return
            slot.failures += 1
            if h.state == EngineState.READY and slot.failures >= self.max_failures:
                self._mark_down(slot, f"{slot.failures} health checks failed in a row")
            if h.state == EngineState.DOWN and self.restart_engines:
                self._recover(slot)
        finally:
            slot.checking = False

    def _mark_down(self, slot: _Slot, reason: str) -> None:
        log.warning("engine %s is DOWN: %s", slot.handle.engine_id, reason)
        slot.handle.state = EngineState.DOWN
        slot.last_error = reason
        down = slot.down_future()
        down.set_result(reason)  # ends its in-flight requests with UNAVAILABLE

    def _recover(self, slot: _Slot) -> None:
        now = time.monotonic()
        if (slot.task is not None and not slot.task.done()) or now < slot.next_restart_at:
            return
        slot.task = asyncio.get_running_loop().create_task(self._restart(slot))

    async def _restart(self, slot: _Slot) -> None:
        h = slot.handle
        try:
            await h.restart()
        except Exception as e:
            backoff = min(60.0, self.health_check_interval_s * 2**slot.attempts)
            slot.attempts += 1
            slot.next_restart_at = time.monotonic() + backoff
            slot.last_error = f"restart failed: {e}"
            h.state = EngineState.DOWN
            log.warning("engine %s restart failed (retry in %.1f s): %s", h.engine_id, backoff, e)
            return
        slot.attempts = 0
        slot.failures, slot.restarts = 0, slot.restarts + 1
        slot.down_future()
        log.info("engine %s is READY again (restart %d)", h.engine_id, slot.restarts)
