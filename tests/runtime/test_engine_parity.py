"""Greedy output of our engine equals transformers, per architecture, for a batch of prompts of
mixed lengths; and still does with prefix caching, tiny prefill chunks and a cache so small that
sequences get preempted and recomputed."""

from __future__ import annotations

import random

import pytest
import torch

from sagellm.runtime.config import EngineConfig
from sagellm.runtime.engine import LLMEngine
from sagellm.runtime.params import SamplingParams
from tests.tiny_models import ARCHS, hf_greedy, load_reference_tokenizer, write_tiny_checkpoint

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return load_reference_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rng = random.Random(7)
    shared = [rng.randrange(len(tokenizer)) for _ in range(35)]
    # Lengths cross block boundaries (16), the sliding window (24), and two share a long prefix.
    lens = [1, 3, 17, 40, 70]
    out = [[rng.randrange(len(tokenizer)) for _ in range(n)] for n in lens]
    out.append(shared + [rng.randrange(len(tokenizer)) for _ in range(9)])
    out.append(shared + [rng.randrange(len(tokenizer)) for _ in range(20)])
    return out


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory, tokenizer, prompts):
    folder = write_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), tokenizer)
    expected, first_logprobs = hf_greedy(folder, prompts, NEW_TOKENS)
    return request.param, folder, expected, first_logprobs


def run_engine(folder, prompts, **cfg):
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", load_progress=False, **cfg))
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outs = engine.generate(prompts, params)
    return engine, outs


def assert_no_leak(engine):
    bm = engine.block_manager
    assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} KV blocks still held"
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    "variant",
    [
        dict(kv_cache_memory_gb=0.05),
        dict(kv_cache_memory_gb=0.05, enable_prefix_caching=False, block_size=32),
        dict(kv_cache_memory_gb=0.05, max_num_batched_tokens=7),
        dict(kv_cache_memory_gb=None, max_num_seqs=2, block_size=16),
    ],
    ids=["default", "no-prefix-cache-bs32", "chunked-prefill-7", "max-2-seqs"],
)
def test_greedy_matches_transformers(checkpoint, prompts, variant):
    arch, folder, expected, _ = checkpoint
    engine, outs = run_engine(folder, prompts, **variant)
    assert [o.token_ids for o in outs] == expected, f"{arch} {variant}"
    assert all(o.finish_reason == "length" for o in outs)
    assert_no_leak(engine)


def test_first_token_logprobs_match(checkpoint, prompts):
    arch, folder, _, first_logprobs = checkpoint
    engine = LLMEngine(
        EngineConfig(
            model=str(folder), dtype="float32", load_progress=False, kv_cache_memory_gb=0.05
        )
    )
    for p, ref in zip(prompts, first_logprobs):
        engine.add_request(p, SamplingParams(max_tokens=1, logprobs=5))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        (o,) = outs
        (lp,) = o.logprobs
        top_ids = [t for t, _ in lp.top]
        assert top_ids == torch.topk(ref, 5).indices.tolist(), arch
        torch.testing.assert_close(
            torch.tensor([v for _, v in lp.top]), ref[top_ids], atol=1e-4, rtol=1e-4
        )
    assert_no_leak(engine)


def test_preemption_under_a_tiny_cache_keeps_outputs_exact(checkpoint, prompts):
    arch, folder, expected, _ = checkpoint
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", load_progress=False))
    per_block = engine.model.kv_bytes_per_token() * 16
    # Room for the longest request (+ watermark) but far less than the batch needs at once.
    engine, outs = run_engine(folder, prompts, kv_cache_memory_gb=per_block * 9 / 2**30)
    assert [o.token_ids for o in outs] == expected
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to be too small"
    assert any(o.metrics.evict_count > 0 for o in outs)
    assert_no_leak(engine)


def test_prefix_cache_hits_on_a_repeated_batch(checkpoint, prompts):
    arch, folder, expected, _ = checkpoint
    engine, first = run_engine(folder, prompts, kv_cache_memory_gb=0.05)
    again = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in again] == expected
    long_ones = [o for o in again if o.num_prompt_tokens > 16]
    assert all(o.metrics.prefix_hit_rate > 0 for o in long_ones)
    assert engine.block_manager.prefix_hit_rate() > 0
    assert_no_leak(engine)
