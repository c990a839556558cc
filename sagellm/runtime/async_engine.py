"""An asyncio face over LLMEngine: many concurrent streaming requests, one stepping thread.

The engine is touched only by its own thread, which loops: take queued commands (add, abort),
run one step, hand each output to its request's asyncio queue. Callers iterate
`generate(...)`; leaving the iteration early (a client that went away) aborts the request and
frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from sagellm.runtime.engine import LLMEngine
from sagellm.runtime.outputs import RequestOutput
from sagellm.runtime.params import SamplingParams

log = logging.getLogger("sagellm.engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a fatal error); the request cannot finish."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop, self.queue, self.remaining = loop, asyncio.Queue(), n

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="sagellm-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request (all its `n` choices, interleaved)."""
        if self._dead is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        params = params or SamplingParams()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, params.n)
        accepted: asyncio.Future = loop.create_future()
        self._send(("add", prompt, params, request_id, priority, stream, accepted))
        rid = await accepted  # raises the engine's RequestError for a bad request
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    stream.remaining -= 1
                    if stream.remaining == 0:
                        finished = True
                        return
        finally:
            if not finished:
                self._send(("abort", rid))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> dict:
        return self.engine.stats()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def num_in_flight(self) -> int:
        return len(self._streams)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # -- engine thread -------------------------------------------------------------------------
    def _send(self, cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, prompt, params, rid, priority, stream, accepted = cmd
            try:
                rid = self.engine.add_request(prompt, params, rid, priority=priority)
            except Exception as e:  # a bad request: the caller gets the error, nobody else does
                stream.loop.call_soon_threadsafe(_set_exception, accepted, e)
                return
            self._streams[rid] = stream
            stream.loop.call_soon_threadsafe(_set_result, accepted, rid)
        elif cmd[0] == "abort":
            rid = cmd[1]
            stream = self._streams.pop(rid, None)
            for out in self.engine.abort(rid):
                if stream is not None:
                    stream.put(out)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                while True:
                    try:
                        self._handle(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # a bug in a step: fail what is in flight, keep serving
                    log.exception("engine step failed; aborting %d requests", len(self._streams))
                    self._fail_all(e)
                    continue
                for out in outs:
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    stream.put(out)
                    if out.finished and all(s.is_finished for s in self._seqs_of(out.request_id)):
                        self._streams.pop(out.request_id, None)
        except BaseException as e:  # pragma: no cover - fatal
            self._dead = e
            log.exception("engine thread died")
        finally:
            self._fail_all(EngineDeadError("the engine stopped"))

    def _seqs_of(self, rid: str):
        return self.engine._requests.get(rid, [])

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # pragma: no cover - best effort while failing
                log.exception("abort of %s failed", rid)
            stream.put(
                EngineDeadError(f"request {rid} failed: {error}")
                if not isinstance(error, EngineDeadError)
                else error
            )
        self._streams.clear()


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
