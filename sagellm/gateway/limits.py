"""Admission control (a bounded queue in front of a fixed number of running requests) and the
request body size limit.

A request holds its admission slot until its response is finished (for a stream: until the last
chunk is sent or the client goes away), so `max_concurrent` bounds what the engines see and
`max_queue` bounds what waits; past both the gateway answers 503 with Retry-After at once
instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sagellm.gateway.errors import GatewayError, error_response
from sagellm.protocol import ErrorCode


class AdmissionQueue:
    def __init__(self, max_concurrent: int, max_queue: int):
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        # Mean time a slot is held, to tell a refused client when to come back.
        self._mean_hold_s = 1.0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely moved by one: mean hold time per slot, >= 1."""
        per_slot = self._mean_hold_s * (self.waiting + 1) / max(1, self.max_concurrent)
        return int(min(60, max(1, math.ceil(per_slot))))

    async def acquire(self) -> float:
        """Wait for a slot; returns the time it was granted. Raises 503 when the queue is full."""
        if self.running < self.max_concurrent and not self._waiters:
            self.running += 1
            self._idle.clear()
            return time.monotonic()
        if len(self._waiters) >= self.max_queue:
            retry = self.retry_after_s()
            raise GatewayError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the server is at capacity ({self.running} requests running, "
                f"{len(self._waiters)} queued); retry after {retry} s",
                status=503,
                headers={"Retry-After": str(retry)},
            )
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over: `running` already counts us
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(time.monotonic())  # granted just as we were cancelled
            else:
                self._waiters.remove(fut)
            raise
        return time.monotonic()

    def release(self, granted_at: float) -> None:
        self._mean_hold_s = 0.9 * self._mean_hold_s + 0.1 * (time.monotonic() - granted_at)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1
        if self.running == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is running (graceful shutdown); False when `timeout_s` passed."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, by Content-Length or while reading a chunked body; the
    body is read here (bounded) and replayed, so handlers never hold an unbounded one."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        engine_format = scope["path"].startswith("/v1/engine/")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(int(declared), engine_format, scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(size, engine_format, scope, receive, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, size, engine_format, scope, receive, send) -> None:
        err = GatewayError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the request body has {size}+ bytes; the limit is {self.max_bytes} bytes",
        )
        # The client is still sending; closing after the reply stops it.
        err.headers["Connection"] = "close"
        await error_response(err, engine_format=engine_format)(scope, receive, send)
