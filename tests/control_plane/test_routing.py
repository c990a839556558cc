"""Routing policies over two real engines, seen through the engine ids in stream events and
EngineHandle.load()."""

from __future__ import annotations

import pytest

from sagellm.control_plane import ControlPlaneManager
from sagellm.control_plane.routing import PREFIX_CHARS, make_policy, prefix_key
from sagellm.protocol import StreamStart
from tests.control_plane.conftest import run, wait_until


def two_engines(engine_config, routing):
    return ControlPlaneManager(
        engine_configs=[engine_config(engine_id="a"), engine_config(engine_id="b")],
        routing=routing,
    )


async def engine_of(cp, prompt="Hi", **fields):
    r = await cp.execute_request(prompt=prompt, max_tokens=2, **fields)
    return r.engine_id


async def busy(cp, prompt):
    """Start a long request and return (stream, engine id) once it runs."""
    stream = cp.stream_request(prompt=prompt, max_tokens=150, ignore_eos=True)
    first = await stream.__anext__()
    assert isinstance(first, StreamStart)
    return stream, first.engine_id


def test_round_robin_alternates(engine_config):
    async def main():
        async with two_engines(engine_config, "round_robin") as cp:
            ids = [await engine_of(cp) for _ in range(4)]
            assert ids in (["a", "b", "a", "b"], ["b", "a", "b", "a"])

    run(main())


def test_least_loaded_prefers_the_idle_engine(engine_config):
    async def main():
        async with two_engines(engine_config, "least_loaded") as cp:
            stream, loaded = await busy(cp, "Long one")
            handles = {h.engine_id: h for h in cp.engines()}
            idle = "b" if loaded == "a" else "a"
            assert handles[loaded].load().in_flight == 1 and handles[idle].load().in_flight == 0
            assert [await engine_of(cp) for _ in range(3)] == [idle] * 3
            await stream.aclose()
            await wait_until(lambda: handles[loaded].load().in_flight == 0)
            # Both idle again: ties rotate, so both engines get work.
            assert {await engine_of(cp) for _ in range(4)} == {"a", "b"}

    run(main())


def test_prefix_affinity_keeps_a_prefix_on_one_engine(engine_config):
    system = "You are a helpful assistant. " * 12  # longer than the hashed prefix
    assert len(system) > PREFIX_CHARS

    async def main():
        async with two_engines(engine_config, "prefix_affinity") as cp:
            owner = await engine_of(cp, system + "Question 1")
            assert [await engine_of(cp, system + f"Question {i}") for i in range(2, 6)] == [
                owner
            ] * 4
            # Load does not move a known prefix; a new prefix goes to the least loaded engine.
            stream, loaded = await busy(cp, system + "a long answer")
            assert loaded == owner
            assert await engine_of(cp, system + "Question 6") == owner
            other = await engine_of(cp, "A different conversation entirely")
            assert other != owner
            assert await engine_of(cp, "A different conversation entirely, again") != owner
            await stream.aclose()
            # Token-id prompts hash their first tokens the same way.
            ids = list(range(100, 180))
            tok_owner = await engine_of(cp, ids)
            assert await engine_of(cp, ids[:64] + [7, 8, 9]) == tok_owner

    run(main())


def test_policy_names_and_prefix_keys():
    assert make_policy("round_robin").name == "round_robin"
    with pytest.raises(ValueError, match="routing = 'fastest'"):
        make_policy("fastest")
    assert prefix_key("x" * PREFIX_CHARS + "a") == prefix_key("x" * PREFIX_CHARS + "b")
    assert prefix_key("x" * 10 + "a") != prefix_key("x" * 10 + "b")
    assert prefix_key(list(range(64)) + [1]) == prefix_key(list(range(64)) + [2])
