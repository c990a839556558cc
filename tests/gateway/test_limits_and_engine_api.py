"""A second server (max_concurrent=1, max_queue=0, engine_routes=True): the full queue answers
503 with Retry-After, and the engine-only API serves protocol events (read by RemoteEngine)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from sagellm.control_plane import ControlPlaneManager, RemoteEngine
from sagellm.control_plane.config import EngineConfig
from sagellm.gateway import GatewaySettings
from sagellm.protocol import Request, parse_stream_event
from tests.gateway.conftest import TINY, serve, tiny_engine_config


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    manager = ControlPlaneManager(engine_configs=[tiny_engine_config(tiny_checkpoint)])
    settings = GatewaySettings(max_concurrent=1, max_queue=0, engine_routes=True, drain_timeout_s=5)
    st, url, _ = serve(manager, settings)
    yield url, manager
    st.stop()


@pytest.fixture
def engine_server(served):
    return served[0]


LONG = {"model": TINY, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}


def test_full_queue_is_503_with_retry_after(served):
    url, manager = served
    (handle,) = manager.engines()
    engine = handle._engine  # the LLMEngine: hold its steps so the first request keeps its slot
    gate, real_step = threading.Event(), engine.step

    calls = []

    def held_step():  # the first step runs (its token reaches the client), later ones wait
        if calls:
            gate.wait(30)
        calls.append(1)
        return real_step()

    engine.step = held_step
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=LONG) as slow:
                # Headers arrive after the first step's event: the request holds the only slot
                # and the engine is stuck in its second step, whatever text the first produced.
                assert slow.status_code == 200
                r = c.post("/v1/completions", json={**LONG, "stream": False, "max_tokens": 2})
                assert r.status_code == 503
                assert int(r.headers["Retry-After"]) >= 1
                err = r.json()["error"]
                assert err["code"] == "RESOURCE_EXHAUSTED" and "capacity" in err["message"]
                gate.set()
            # the slot is free again once the server has seen the client close the stream
            deadline = time.monotonic() + 15
            while True:
                r = c.post("/v1/completions", json={**LONG, "stream": False, "max_tokens": 2})
                if r.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 200
    finally:
        gate.set()
        engine.step = real_step


def test_engine_info_load_and_health(engine_server):
    with httpx.Client(base_url=engine_server, timeout=30) as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["model"] == TINY and h["engine_id"]
        info = c.get("/v1/engine/info").json()
        assert info["model"] == TINY and info["max_model_len"] == 512
        load = c.get("/v1/engine/load").json()
        assert set(load) == {"running", "waiting", "kv_usage", "in_flight"}


def test_engine_generate_streams_protocol_events(engine_server):
    req = Request(model=TINY, prompt="Hello", max_tokens=5, ignore_eos=True)
    with httpx.Client(base_url=engine_server, timeout=30) as c:
        with c.stream("POST", "/v1/engine/generate", json=req.model_dump(mode="json")) as r:
            assert r.status_code == 200
            events = [parse_stream_event(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:")]
        assert events[0].event == "start" and events[-1].event == "end"
        end = events[-1]
        assert end.finish_reason == "length" and len(end.output_tokens) == 5
        assert end.request_id == req.request_id and end.trace_id == req.trace_id
        assert "".join(e.chunk for e in events if e.event == "delta") == end.output_text
        # a refused request: protocol error body with the HTTP status of its code
        bad = {**req.model_dump(mode="json"), "prompt": "hi " * 600, "request_id": "r2"}
        r = c.post("/v1/engine/generate", json=bad)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "CONTEXT_LENGTH_EXCEEDED"
        r = c.post("/v1/engine/generate", content=json.dumps({"model": TINY}))
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_remote_engine_talks_to_the_engine_api(engine_server):
    async def run():
        cfg = EngineConfig(kind="remote", url=engine_server, model_name=TINY)
        async with ControlPlaneManager(engine_configs=[cfg]) as cp:
            assert isinstance(cp.engines()[0], RemoteEngine)
            return await cp.execute_request(prompt="Hello", max_tokens=4, ignore_eos=True)

    resp = asyncio.run(run())
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 4
