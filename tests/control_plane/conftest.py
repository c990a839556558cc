"""A tiny llama checkpoint (random weights, the real SmolLM2 tokenizer) served by engines that
start in about a second; and a helper that runs a coroutine with a deadline, so a bug that
hangs a request fails the test instead of the suite."""

from __future__ import annotations

import asyncio

import pytest

from sagellm.control_plane import EngineConfig
from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

MODEL = "tiny"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cp-llama")
    write_tiny_checkpoint("llama", folder, load_reference_tokenizer())
    return str(folder)


@pytest.fixture(scope="session")
def engine_config(tiny_model):
    """EngineConfig(**overrides) for the tiny model, served as "tiny"."""

    def make(**overrides) -> EngineConfig:
        fields = dict(
            model=tiny_model, model_name=MODEL, kv_cache_memory_gb=0.02, max_model_len=256
        )
        fields.update(overrides)
        return EngineConfig(**fields)

    return make


def run(coro, timeout: float = 30.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
