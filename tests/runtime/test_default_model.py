"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our engine's greedy fp32 output for
a batch of chat and raw prompts of mixed lengths, run together, equals transformers' on the same
file token for token, and the first-token log-probabilities agree."""

from __future__ import annotations

import pytest
import torch

from sagellm.runtime.config import EngineConfig
from sagellm.runtime.engine import LLMEngine
from sagellm.runtime.params import SamplingParams
from tests.tiny_models import DEFAULT_GGUF, default_gguf_dir, hf_greedy

NEW_TOKENS = 20
CHATS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
]
RAW = ["The quick brown fox", "def fibonacci(n):\n    ", "Paris is"]


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_memory_gb=0.25, load_progress=False))


@pytest.fixture(scope="module")
def prompts(engine):
    tok = engine.tokenizer
    chats = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False
        )
        for c in CHATS
    ]
    return chats + [tok.encode(r) for r in RAW]


@pytest.fixture(scope="module")
def reference(prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        default_gguf_dir(), gguf_file=DEFAULT_GGUF, dtype=torch.float32
    )
    return hf_greedy(model, prompts, NEW_TOKENS)


def test_batch_matches_transformers_token_for_token(engine, prompts, reference):
    expected, _ = reference
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert engine.block_manager.num_used_blocks == 0


def test_first_token_logprobs_match_transformers(engine, prompts, reference):
    _, first = reference
    outs = engine.generate(prompts, SamplingParams(max_tokens=1, logprobs=5))
    for o, ref in zip(outs, first):
        (lp,) = o.logprobs
        ids = [t for t, _ in lp.top]
        assert ids == torch.topk(ref, 5).indices.tolist()
        torch.testing.assert_close(
            torch.tensor([v for _, v in lp.top]), ref[ids], atol=2e-4, rtol=1e-4
        )


def test_answers_the_capital_question(engine):
    tok = engine.tokenizer
    p = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    (out,) = engine.generate(
        [tok.encode(p, add_special_tokens=False)], SamplingParams(max_tokens=32)
    )
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    m = out.metrics
    assert m.ttft_ms > 0 and m.tpot_ms > 0 and m.throughput_tps > 0
    assert m.prompt_tokens == len(tok.encode(p, add_special_tokens=False))
    assert m.kv_used_tokens >= m.prompt_tokens and m.peak_mem_mb > 0
