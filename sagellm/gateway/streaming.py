"""A request's event stream from the control plane, with a deadline and a guaranteed close, and
an SSE response that notices a client going away even while the engine is silent.

Closing the event iterator is what aborts a request in the engine and frees its KV blocks, so
every path out of a request (finished, error, timeout, client gone, server shutdown) closes it,
shielded from the cancellation that may have caused the exit.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from sagellm.gateway.errors import GatewayError
from sagellm.protocol import ErrorCode, Request, StreamDelta, StreamEnd, StreamStart

Event = StreamStart | StreamDelta | StreamEnd


class EventStream:
    """The events of one request; `next()` raises TIMEOUT past the deadline."""

    def __init__(self, events: AsyncIterator[Event], deadline: float):
        self._events, self.deadline = events, deadline
        self._closed = False

    @classmethod
    async def open(cls, manager: Any, request: Request, deadline: float) -> EventStream:
        events = manager.stream_request(request)
        if inspect.isawaitable(events):  # a coroutine returning the iterator, or a generator
            events = await _before(events, deadline)
        return cls(events, deadline)

    async def next(self) -> Event | None:
        """The next event, or None at the end."""
        try:
            return await _before(self._events.__anext__(), self.deadline)
        except StopAsyncIteration:
            return None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._events, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()


async def _before(awaitable, deadline: float):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        raise GatewayError(ErrorCode.TIMEOUT, "the request deadline passed")
    # Await in this task (not wait_for's inner task): a cancelled client must not leave the
    # event generator running in another task while the response closes it.
    try:
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + remaining):
            return await awaitable
    except TimeoutError:
        raise GatewayError(ErrorCode.TIMEOUT, "the request deadline passed") from None


class SSEResponse(Response):
    """text/event-stream over `body`; stops (and closes `body`) when the client disconnects,
    then calls `on_close(disconnected)` once. (A Response subclass so FastAPI passes it through
    untouched; Starlette's StreamingResponse notices a disconnect only when a write fails.)"""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        on_close: Callable[[bool], Any],
        headers: dict[str, str] | None = None,
    ):
        self.body_iter, self.on_close, self.extra_headers = body, on_close, headers or {}
        self.status_code = 200
        self.background = None
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((k.lower().encode(), v.encode()) for k, v in self.extra_headers.items()),
        ]
        try:
            async with anyio.create_task_group() as tg:

                async def pump() -> None:
                    nonlocal disconnected
                    try:
                        await send(
                            {"type": "http.response.start", "status": 200, "headers": headers}
                        )
                        async for chunk in self.body_iter:
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                        # Free the slot before the client sees the end, so that its next
                        # request finds it free.
                        await self._close(False)
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # the socket went away while writing
                        disconnected = True
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal disconnected
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            disconnected = True
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(pump)
                tg.start_soon(watch)
        finally:
            await self._close(disconnected)

    async def _close(self, disconnected: bool) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            close = getattr(self.body_iter, "aclose", None)
            if close is not None:
                await close()
            result = self.on_close(disconnected)
            if inspect.isawaitable(result):
                await result
