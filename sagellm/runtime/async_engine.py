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
import uuid
from collections.abc import AsyncIterator, Sequence

from sagellm.runtime.engine import LLMEngine
from sagellm.runtime.errors import TensorParallelError
from sagellm.runtime.outputs import RequestOutput
from sagellm.runtime.params import SamplingParams

log = logging.getLogger("sagellm.engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a fatal error); the request cannot finish."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop, self.queue = loop, asyncio.Queue()
        self.n, self.finished = n, 0  # counted on the engine thread

    def put(self, item) -> bool:
        """Hand an item to the consumer's loop; False if that loop is gone (client vanished)."""
        return self.call(self.queue.put_nowait, item)

    def call(self, fn, *args) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the event loop is closed
            return False


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
        # The id is fixed here, so a consumer cancelled while waiting for acceptance can still
        # abort its request.
        rid = request_id if request_id is not None else f"areq-{uuid.uuid4().hex}"
        self._send(("add", prompt, params, rid, priority, stream, accepted))
        finished, remaining = False, params.n
        try:
            try:
                await accepted
            except Exception:  # refused (RequestError): nothing was queued, nothing to abort
                finished = True
                raise
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                yield item
                if item.finished:
                    remaining -= 1
                    if remaining == 0:
                        finished = True
                        return
        finally:
            if not finished:
                # Names the stream too: if the add was refused (say a duplicate id), this must
                # not abort the other request that owns the id.
                self._send(("abort", rid, stream))

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
        if not self._thread.is_alive():
            self.engine.close()  # tensor-parallel workers, if any

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
                stream.call(_set_exception, accepted, e)
                return
            self._streams[rid] = stream
            if not stream.call(_set_result, accepted, rid):
                self._abort(rid)
        elif cmd[0] == "abort":
            rid, owner = cmd[1], cmd[2] if len(cmd) > 2 else None
            if owner is None or self._streams.get(rid) is owner:
                self._abort(rid)

    def _abort(self, rid: str) -> None:
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
                except TensorParallelError:  # a rank is gone: the engine cannot continue
                    raise
                except Exception as e:  # a bug in a step: fail what is in flight, keep serving
                    log.exception("engine step failed; aborting %d requests", len(self._streams))
                    self._fail_all(e)
                    continue
                for out in outs:
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    if not stream.put(out):  # the client's loop is gone: stop its work
                        self._abort(out.request_id)
                        continue
                    if out.finished:
                        stream.finished += 1
                        if stream.finished == stream.n:
                            self._streams.pop(out.request_id, None)
        except BaseException as e:  # pragma: no cover - fatal
            self._dead = e
            log.exception("engine thread died")
        finally:
            self._fail_all(EngineDeadError("the engine stopped"))

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
