"""RemoteEngine against a real HTTP server on loopback: a small FastAPI app implementing the
engine-only API of the spec over a real LocalEngine, run by uvicorn in a background thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from sagellm.control_plane import ControlPlaneManager, EngineConfig, EngineState, LocalEngine
from sagellm.control_plane.subprocess_engine import free_port
from sagellm.protocol import (
    HTTP_STATUS,
    ErrorCode,
    ProtocolError,
    Request,
    StreamDelta,
    StreamEnd,
    StreamStart,
)
from tests.control_plane.conftest import MODEL, run, wait_until


def engine_app(engine: LocalEngine) -> FastAPI:
    app = FastAPI()

    def error(code: ErrorCode, message: str) -> JSONResponse:
        body = {"error": {"code": code.value, "message": message}}
        return JSONResponse(body, status_code=HTTP_STATUS[code])

    @app.get("/health")
    async def health():
        ok = await engine.health()
        body = {"status": "ok" if ok else "unavailable", "engine_id": engine.engine_id}
        return JSONResponse({**body, "model": engine.model}, status_code=200 if ok else 503)

    @app.get("/v1/engine/info")
    async def info():
        return engine.info()

    @app.get("/v1/engine/load")
    async def load():
        return engine.load().to_dict()

    @app.post("/v1/engine/generate")
    async def generate(http: HttpRequest):
        try:
            request = Request.model_validate_json(await http.body())
        except ValidationError as e:
            return error(ErrorCode.INVALID_ARGUMENT, str(e.errors()[0]["msg"]))
        events = engine.generate(request)
        try:
            first = await events.__anext__()
        except ProtocolError as e:
            return error(e.code, e.error.message)

        async def sse():
            try:
                yield f"data: {first.model_dump_json()}\n\n"
                async for event in events:
                    yield f"data: {event.model_dump_json()}\n\n"
            except ProtocolError as e:
                end = StreamEnd(
                    request_id=request.request_id,
                    trace_id=request.trace_id,
                    engine_id=engine.engine_id,
                    finish_reason="error",
                    error=e.error,
                )
                yield f"data: {end.model_dump_json()}\n\n"
            finally:
                await events.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server(engine_config):
    """(url, the server's LocalEngine)."""
    engine = LocalEngine(engine_config(engine_id="served"))
    asyncio.run(engine.start())
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(engine_app(engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(10)
    asyncio.run(engine.stop(0))


def remote_manager(url, **kw):
    return ControlPlaneManager(
        engine_configs=[EngineConfig(kind="remote", url=url, engine_id="r")], **kw
    )


def test_remote_engine_serves_requests_and_streams(server):
    url, served = server

    async def main():
        async with remote_manager(url) as cp:
            assert cp.models() == [MODEL]  # learned from the server
            handle = cp.engines()[0]
            assert handle.info()["max_model_len"] == 256 and handle.info()["url"] == url
            assert handle.tokenizer() is not None  # the model files are readable from here
            r = await cp.execute_request(prompt="Hello there", max_tokens=8, ignore_eos=True)
            assert r.engine_id == "r" and len(r.output_tokens) == 8 and r.metrics.ttft_ms > 0
            assert r.usage.completion_tokens == 8
            events = [
                e
                async for e in cp.stream_request(
                    prompt="Hello there", max_tokens=8, ignore_eos=True
                )
            ]
            assert isinstance(events[0], StreamStart) and isinstance(events[-1], StreamEnd)
            deltas = [e for e in events if isinstance(e, StreamDelta)]
            assert "".join(d.chunk for d in deltas) == events[-1].output_text == r.output_text
            assert {e.engine_id for e in events} == {"r"}
            # n > 1 over the wire.
            ends = [
                e
                async for e in cp.stream_request(prompt="Hi", max_tokens=3, n=2, ignore_eos=True)
                if isinstance(e, StreamEnd)
            ]
            assert sorted(e.index for e in ends) == [0, 1]
            # Refusals keep their protocol code across HTTP.
            with pytest.raises(ProtocolError) as e:
                await cp.execute_request(prompt="hi", max_tokens=300)
            assert e.value.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
            with pytest.raises(ProtocolError) as e:
                await cp.execute_request(prompt=[10**7], max_tokens=3)
            assert e.value.code == ErrorCode.INVALID_ARGUMENT
            # Closing a remote stream early aborts the request on the server.
            stream = cp.stream_request(prompt="long", max_tokens=200, ignore_eos=True)
            await stream.__anext__()
            await wait_until(lambda: served.load().in_flight == 1, 5, "server in flight")
            await stream.aclose()
            await wait_until(lambda: served.load().in_flight == 0, 5, "abort on the server")
            assert served.stats()["kv_blocks_used"] == 0
            assert handle.load().in_flight == 0

    run(main())


def test_remote_engine_down_then_back(server):
    """The server's engine dies mid-stream: the request fails with UNAVAILABLE, the remote is
    marked DOWN; once the server answers again it is READY without a restart of ours."""
    url, served = server

    async def main():
        async with remote_manager(url, health_check_interval_s=0.05, max_failures=2) as cp:
            handle = cp.engines()[0]
            stream = cp.stream_request(prompt="doomed", max_tokens=200, ignore_eos=True)
            await stream.__anext__()
            await asyncio.to_thread(served._async.shutdown)
            with pytest.raises(ProtocolError) as e:
                await asyncio.wait_for(_drain(stream), 5)
            assert e.value.code == ErrorCode.UNAVAILABLE
            await wait_until(lambda: handle.state == EngineState.DOWN, 5, "DOWN")
            await served.restart()  # the server's operator brings its engine back
            await wait_until(lambda: handle.state == EngineState.READY, 10, "READY again")
            r = await cp.execute_request(prompt="back", max_tokens=3, ignore_eos=True)
            assert len(r.output_tokens) == 3

    run(main())


def test_unreachable_remote_fails_to_start():
    async def main():
        cfg = EngineConfig(kind="remote", url=f"http://127.0.0.1:{free_port()}")
        cp = ControlPlaneManager(engine_configs=[cfg])
        cp.engines()[0].start_timeout_s = 0.5
        with pytest.raises(RuntimeError, match="no healthy engine-only server"):
            await cp.start()

    run(main())


async def _drain(stream):
    return [e async for e in stream]
