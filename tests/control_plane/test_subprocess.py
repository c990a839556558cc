"""SubprocessEngine: the control plane spawns `sage-llm serve --engine-only`, talks to it over
HTTP, and respawns it when the process dies."""

from __future__ import annotations

import importlib.util
import signal

import pytest

from sagellm.control_plane import ControlPlaneManager, EngineState
from sagellm.protocol import ErrorCode, ProtocolError
from tests.control_plane.conftest import MODEL, run, wait_until

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sagellm.cli.serve") is None
    or importlib.util.find_spec("sagellm.gateway") is None,
    reason="needs `sage-llm serve --engine-only` (sagellm.cli.serve and sagellm.gateway)",
)


@pytest.mark.slow
def test_spawned_engine_serves_and_is_respawned(engine_config):
    async def main():
        cfg = engine_config(kind="subprocess", engine_id="sp", num_threads=1)
        cp = ControlPlaneManager(engine_configs=[cfg], health_check_interval_s=0.1, max_failures=2)
        async with cp:
            handle = cp.engines()[0]
            assert cp.models() == [MODEL] and handle.state == EngineState.READY
            r = await cp.execute_request(prompt="Hello", max_tokens=5, ignore_eos=True)
            assert r.engine_id == "sp" and len(r.output_tokens) == 5
            first_pid = handle.process.pid
            stream = cp.stream_request(prompt="crash", max_tokens=200, ignore_eos=True)
            await stream.__anext__()
            handle.process.send_signal(signal.SIGKILL)
            with pytest.raises(ProtocolError) as e:
                async for _ in stream:
                    pass
            assert e.value.code == ErrorCode.UNAVAILABLE
            await wait_until(
                lambda: handle.state == EngineState.READY and handle.process.pid != first_pid,
                60,
                "respawn",
            )
            r = await cp.execute_request(prompt="again", max_tokens=3, ignore_eos=True)
            assert len(r.output_tokens) == 3
            process = handle.process
        assert process.poll() is not None  # stop() ended the child

    run(main(), timeout=120)
