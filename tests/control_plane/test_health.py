"""An engine that dies or hangs mid-run: its requests fail with UNAVAILABLE promptly, it is
marked DOWN, restarted, and serves again."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sagellm.control_plane import ControlPlaneManager, EngineState, LocalEngine
from sagellm.protocol import ErrorCode, ProtocolError, StreamDelta
from tests.control_plane.conftest import run, wait_until


async def first_delta(stream):
    async for event in stream:
        if isinstance(event, StreamDelta):
            return


async def drain(stream):
    return [e async for e in stream]


def test_engine_killed_mid_run_is_marked_down_and_restarted(engine_config):
    async def main():
        cp = ControlPlaneManager(
            engine_configs=[engine_config()],
            health_check_interval_s=0.05,
            max_failures=2,
            restart_engines=False,
        )
        async with cp:
            handle = cp.engines()[0]
            streams = [
                cp.stream_request(prompt=f"Request {i}", max_tokens=200, ignore_eos=True)
                for i in range(2)
            ]
            for s in streams:
                await first_delta(s)
            # Kill the engine thread for real: it stops stepping and fails what it holds.
            killer = asyncio.create_task(asyncio.to_thread(handle._async.shutdown))
            for s in streams:
                with pytest.raises(ProtocolError) as e:
                    await asyncio.wait_for(drain(s), 5)
                assert e.value.code == ErrorCode.UNAVAILABLE
            await killer
            await wait_until(lambda: handle.state == EngineState.DOWN, 5, "DOWN")
            with pytest.raises(ProtocolError) as e:
                await cp.execute_request(prompt="while down", max_tokens=2)
            assert e.value.code == ErrorCode.UNAVAILABLE and "DOWN" in e.value.error.message
            assert cp.status()["engines"][0]["state"] == "DOWN"

            cp.restart_engines = True
            await wait_until(lambda: handle.state == EngineState.READY, 20, "restart")
            r = await cp.execute_request(prompt="after restart", max_tokens=4, ignore_eos=True)
            assert r.finish_reason == "length" and len(r.output_tokens) == 4
            assert cp.status()["engines"][0]["restarts"] == 1

    run(main(), timeout=45)


def test_hung_engine_is_failed_by_the_health_check(engine_config):
    """The engine thread is alive but stuck in a step: only the health check can see it."""

    async def main():
        handle = LocalEngine(engine_config(), stall_timeout_s=0.3)
        cp = ControlPlaneManager(engine_configs=[], health_check_interval_s=0.05, max_failures=2)
        cp.add_engine(handle)
        async with cp:
            release = threading.Event()
            engine = handle._engine
            real_step = engine.step

            def stuck_step():
                out = real_step()
                release.wait()  # the engine thread hangs here
                return out

            stream = cp.stream_request(prompt="hang", max_tokens=100, ignore_eos=True)
            await stream.__anext__()
            engine.step = stuck_step
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(ProtocolError) as e:
                await asyncio.wait_for(drain(stream), 5)
            assert e.value.code == ErrorCode.UNAVAILABLE and "went down" in e.value.error.message
            assert asyncio.get_running_loop().time() - t0 < 3
            release.set()  # let the old thread finish so the restart can shut it down
            await wait_until(
                lambda: handle.state == EngineState.READY and handle._engine is not engine,
                20,
                "restart",
            )
            r = await cp.execute_request(prompt="alive", max_tokens=3, ignore_eos=True)
            assert len(r.output_tokens) == 3

    run(main(), timeout=45)
