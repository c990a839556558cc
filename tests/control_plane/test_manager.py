"""ControlPlaneManager over real in-process engines: requests, streams, errors, drain."""

from __future__ import annotations

import asyncio

import pytest

from sagellm.control_plane import ControlPlaneManager, EngineState
from sagellm.protocol import ErrorCode, ProtocolError, Request, StreamDelta, StreamEnd, StreamStart
from tests.control_plane.conftest import MODEL, run


def test_execute_request_returns_text_metrics_usage(engine_config):
    async def main():
        async with ControlPlaneManager(engine_configs=[engine_config()]) as cp:
            assert cp.models() == [MODEL]
            r = await cp.execute_request(prompt="Hello there", max_tokens=8, ignore_eos=True)
            assert r.finish_reason == "length" and r.output_text
            assert len(r.output_tokens) == 8
            assert r.metrics.ttft_ms > 0 and r.metrics.throughput_tps > 0
            assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
            assert r.engine_id == cp.engines()[0].engine_id
            # The same request as a protocol Request, and greedy is reproducible.
            again = await cp.execute_request(
                Request(model=MODEL, prompt="Hello there", max_tokens=8, ignore_eos=True)
            )
            assert again.output_tokens == r.output_tokens
            assert cp.tokenizer_for(MODEL) is not None and cp.tokenizer_for("nope") is None
            info = cp.engines()[0].info()
            assert info["max_model_len"] == 256 and info["device"] == "cpu"
            assert cp.status()["engines"][0]["state"] == "READY"
            handle = cp.engines()[0]
        assert handle.state == EngineState.STOPPED
        with pytest.raises(ProtocolError) as e:
            await cp.execute_request(prompt="hi")
        assert e.value.code == ErrorCode.UNAVAILABLE

    run(main())


def test_stream_request_events_are_consistent(engine_config):
    async def main():
        async with ControlPlaneManager(engine_configs=[engine_config()]) as cp:
            events = [
                e
                async for e in cp.stream_request(prompt="Once upon", max_tokens=12, ignore_eos=True)
            ]
        assert isinstance(events[0], StreamStart) and events[0].prompt_tokens > 0
        assert isinstance(events[-1], StreamEnd)
        deltas = [e for e in events if isinstance(e, StreamDelta)]
        assert all(isinstance(e, (StreamStart, StreamDelta)) for e in events[:-1])
        end = events[-1]
        assert "".join(d.chunk for d in deltas) == end.output_text
        assert [t for d in deltas for t in d.chunk_tokens] == end.output_tokens
        assert len(end.output_tokens) == 12 and end.finish_reason == "length"
        assert end.usage.completion_tokens == 12 and end.metrics.ttft_ms > 0
        assert len({e.engine_id for e in events}) == 1 and events[0].engine_id

    run(main())


def test_n_choices(engine_config):
    async def main():
        async with ControlPlaneManager(engine_configs=[engine_config()]) as cp:
            events = [
                e
                async for e in cp.stream_request(
                    prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=7, ignore_eos=True
                )
            ]
            ends = {e.index: e for e in events if isinstance(e, StreamEnd)}
            assert sorted(ends) == [0, 1, 2]
            for i, end in ends.items():
                chunks = [e.chunk for e in events if isinstance(e, StreamDelta) and e.index == i]
                assert "".join(chunks) == end.output_text and len(end.output_tokens) == 6
            assert len({tuple(e.output_tokens) for e in ends.values()}) > 1  # seeds differ
            first = await cp.execute_request(
                prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=7, ignore_eos=True
            )
            assert first.output_tokens == ends[0].output_tokens

    run(main())


def test_bad_requests_fail_alone(engine_config):
    async def main():
        async with ControlPlaneManager(engine_configs=[engine_config()]) as cp:
            long_run = cp.stream_request(prompt="Keep going", max_tokens=60, ignore_eos=True)
            first = await long_run.__anext__()
            assert isinstance(first, StreamStart)
            cases = [
                (dict(model="no-such-model"), ErrorCode.MODEL_NOT_FOUND),
                (dict(max_tokens=0), ErrorCode.INVALID_ARGUMENT),
                (dict(temperature=5.0), ErrorCode.INVALID_ARGUMENT),
                (dict(top_p=0.0), ErrorCode.INVALID_ARGUMENT),
                (dict(prompt=[10**7]), ErrorCode.INVALID_ARGUMENT),
                (dict(prompt=""), ErrorCode.INVALID_ARGUMENT),
                (dict(unknown_field=1), ErrorCode.INVALID_ARGUMENT),
                (
                    dict(prompt=list(range(1, 251)), max_tokens=10),
                    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                ),
                (dict(max_tokens=300), ErrorCode.CONTEXT_LENGTH_EXCEEDED),
                (dict(kv_budget_tokens=1), ErrorCode.RESOURCE_EXHAUSTED),
            ]
            for fields, code in cases:
                fields = {"prompt": "hello", "max_tokens": 4, **fields}
                with pytest.raises(ProtocolError) as e:
                    await cp.execute_request(**fields)
                assert e.value.code == code, (fields, e.value.error)
                assert e.value.error.message
            rest = [e async for e in long_run]
            assert isinstance(rest[-1], StreamEnd) and rest[-1].finish_reason == "length"
            assert len(rest[-1].output_tokens) == 60
            # kv_budget_tokens caps what the request may hold: prompt + output.
            capped = await cp.execute_request(
                prompt=[5, 6, 7, 8], max_tokens=50, kv_budget_tokens=10, ignore_eos=True
            )
            assert len(capped.output_tokens) == 6 and capped.finish_reason == "length"
            stats = cp.engines()[0].stats()
            assert stats["kv_blocks_used"] == 0 and stats["running"] == 0

    run(main())


def test_closing_a_stream_aborts_the_request(engine_config):
    async def main():
        async with ControlPlaneManager(engine_configs=[engine_config()]) as cp:
            handle = cp.engines()[0]
            stream = cp.stream_request(prompt="abc", max_tokens=200, ignore_eos=True)
            async for event in stream:
                if isinstance(event, StreamDelta):
                    break
            assert handle.load().in_flight == 1
            await stream.aclose()
            await _until(lambda: handle.load().in_flight == 0 and not handle.stats()["running"])
            assert handle.stats()["kv_blocks_used"] == 0

    run(main())


def test_graceful_stop_drains(engine_config):
    async def main():
        cp = ControlPlaneManager(engine_configs=[engine_config()])
        await cp.start()
        stream = cp.stream_request(prompt="Drain me", max_tokens=40, ignore_eos=True)
        await stream.__anext__()
        stopping = asyncio.create_task(cp.stop(drain_timeout_s=30))
        await asyncio.sleep(0)
        with pytest.raises(ProtocolError) as e:  # no new work once stopping
            await cp.execute_request(prompt="late", max_tokens=2)
        assert e.value.code == ErrorCode.UNAVAILABLE
        rest = [ev async for ev in stream]
        assert rest[-1].finish_reason == "length" and len(rest[-1].output_tokens) == 40
        await stopping
        assert cp.engines()[0].state == EngineState.STOPPED

    run(main())


async def _until(predicate, timeout=5.0):
    from tests.control_plane.conftest import wait_until

    await wait_until(predicate, timeout)
