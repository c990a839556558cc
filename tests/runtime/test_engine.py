"""LLMEngine behaviour on a tiny random Llama checkpoint (real SmolLM2 tokenizer): sampling
reproducibility, n > 1, stop conditions, logprobs, abort, limits and bad requests, priorities,
streaming and metrics. Every test must leave no KV block held and no request pending."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sagellm.runtime.config import EngineConfig
from sagellm.runtime.engine import LLMEngine
from sagellm.runtime.errors import ContextLengthExceeded, KVBudgetImpossible, RequestError
from sagellm.runtime.params import SamplingParams
from sagellm.runtime.sampler import SamplerOutput
from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,"]


def tiny_llama(tmp_path_factory) -> Path:
    """One tiny Llama checkpoint per session (shared by the runtime test modules)."""
    folder = tmp_path_factory.getbasetemp() / "tiny-llama-engine"
    if not (folder / "config.json").exists():
        write_tiny_checkpoint("llama", folder, load_reference_tokenizer())
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    threads = torch.get_num_threads()
    yield tiny_llama(tmp_path_factory)
    torch.set_num_threads(threads)  # the engines below pin one thread; give the rest back


def make_engine(folder, **cfg) -> LLMEngine:
    # One thread: a 2-layer model is too small to gain from more, and on a busy 2-core machine
    # more threads are ~10x slower.
    cfg = {"dtype": "float32", "load_progress": False, "num_threads": 1, **cfg}
    cfg.setdefault("kv_cache_memory_gb", 0.02)
    return LLMEngine(EngineConfig(model=str(folder), **cfg))


@pytest.fixture(scope="module")
def engine(ckpt):
    return make_engine(ckpt)


def assert_no_leak(engine: LLMEngine) -> None:
    assert engine.block_manager.num_used_blocks == 0, "KV blocks still held"
    assert not engine.has_unfinished()
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    if "engine" in request.fixturenames:
        eng = request.getfixturevalue("engine")
        try:
            assert_no_leak(eng)
        finally:  # keep later tests on the shared engine independent of a failed one
            for rid in list(eng._requests):
                eng.abort(rid)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def sampled(seed, max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=seed, **kw)


def run_streaming(engine: LLMEngine) -> dict:
    """Step to the end; per (request, index): the deltas, new ids, logprobs and final output."""
    got: dict = {}
    while engine.has_unfinished():
        for o in engine.step():
            g = got.setdefault((o.request_id, o.index), {"deltas": [], "ids": [], "lps": []})
            g["deltas"].append(o.delta_text)
            g["ids"] += o.new_token_ids
            g["lps"] += o.logprobs or []
            if o.finished:
                assert "final" not in g, "two final outputs for one sequence"
                g["final"] = o
    return got


# -- sampling ----------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):
    (alone,) = engine.generate([PROMPTS[0]], sampled(1234))
    (again,) = engine.generate([PROMPTS[0]], sampled(1234))
    assert alone.token_ids == again.token_ids
    batch = engine.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]],
        [sampled(None), sampled(1234), sampled(7), greedy()],
    )
    assert batch[1].token_ids == alone.token_ids
    (other,) = engine.generate([PROMPTS[0]], sampled(1235))
    assert other.token_ids != alone.token_ids
    assert len(alone.token_ids) == 12


def test_unseeded_temperature_sampling_runs(engine):
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=50, min_p=0.01)
    outs = engine.generate(PROMPTS, params)
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]
    vocab = engine.model_config.vocab_size
    assert all(0 <= t < vocab for o in outs for t in o.token_ids)


def test_greedy_is_deterministic_across_batches(engine):
    alone = [engine.generate([p], greedy())[0].token_ids for p in PROMPTS]
    together = [o.token_ids for o in engine.generate(PROMPTS, greedy())]
    assert alone == together


def test_n_choices_have_distinct_indices_and_seeded_sequences(engine):
    outs = engine.generate([PROMPTS[0]], sampled(99, n=3))
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert len({o.request_id for o in outs}) == 1
    assert len({tuple(o.token_ids) for o in outs}) == 3
    # Choice 0 with seed s draws like a single request with seed s; the choices reproduce.
    (single,) = engine.generate([PROMPTS[0]], sampled(99))
    assert outs[0].token_ids == single.token_ids
    again = engine.generate([PROMPTS[0]], sampled(99, n=3))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    # Greedy choices are all the greedy answer.
    g = engine.generate([PROMPTS[0]], greedy(n=2))
    (g1,) = engine.generate([PROMPTS[0]], greedy())
    assert [o.token_ids for o in g] == [g1.token_ids] * 2


# -- stop conditions ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(engine):
    """Greedy continuation of PROMPTS[1] without any stop: ids and text."""
    (out,) = engine.generate([PROMPTS[1]], greedy(16))
    assert out.text == engine.tokenizer.decode(out.token_ids)
    return out.token_ids, out.text


def test_max_tokens_finishes_with_length(engine, reference):
    ids, _ = reference
    (out,) = engine.generate([PROMPTS[1]], greedy(5))
    assert out.token_ids == ids[:5] and out.finish_reason == "length"
    assert out.metrics.output_tokens == 5


def test_stop_string_truncates_text(engine, reference):
    ids, text = reference
    # A piece of the text well inside the output (the 4th token's text, stripped).
    stop = engine.tokenizer.decode(ids[3:4]).strip()
    assert len(stop) >= 2
    cut = text.index(stop)
    (out,) = engine.generate([PROMPTS[1]], greedy(16, stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == text[:cut]
    assert len(out.token_ids) < 16
    (inc,) = engine.generate([PROMPTS[1]], greedy(16, stop=[stop], include_stop_str_in_output=True))
    assert inc.text == text[: cut + len(stop)] and inc.finish_reason == "stop"


def test_stop_token_id_ends_the_sequence(engine, reference):
    ids, _ = reference
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    (out,) = engine.generate([PROMPTS[1]], greedy(16, stop_token_ids=[ids[k]]))
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[: k + 1]
    assert out.text == engine.tokenizer.decode(ids[:k])  # the stop token itself is not text


@pytest.fixture(scope="module")
def eos_ckpt(ckpt, reference, tmp_path_factory):
    """The same weights with a config whose EOS is a token the model emits greedily."""
    ids, _ = reference
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    folder = tmp_path_factory.mktemp("tiny-llama-eos")
    for f in ckpt.iterdir():
        if f.name not in ("config.json", "generation_config.json"):
            os.symlink(f, folder / f.name)
    for name in ("config.json", "generation_config.json"):
        d = json.loads((ckpt / name).read_text())
        d["eos_token_id"] = ids[k]
        (folder / name).write_text(json.dumps(d))
    return folder, ids, k


def test_eos_stops_unless_ignore_eos(eos_ckpt):
    folder, ids, k = eos_ckpt
    eng = make_engine(folder)
    assert ids[k] in eng.eos_token_ids
    (out,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=16))
    assert out.finish_reason == "stop" and out.token_ids == ids[: k + 1]
    (out,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=16, ignore_eos=True))
    assert out.finish_reason == "length" and out.token_ids == ids
    assert_no_leak(eng)


# -- logprobs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_per_streamed_token(engine, k):
    engine.add_request(PROMPTS[0], greedy(5, logprobs=k))
    engine.add_request(PROMPTS[1], greedy(5))  # a neighbour that asked for none
    got = run_streaming(engine)
    with_lp, without = sorted(got.values(), key=lambda g: -len(g["lps"]))
    assert without["lps"] == []
    assert len(with_lp["lps"]) == 5
    for tok, lp in zip(with_lp["ids"], with_lp["lps"]):
        assert lp.token_id == tok
        assert lp.logprob <= 0.0
        assert len(lp.top) == k
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        if k:  # greedy: the chosen token is the best one
            assert lp.top[0][0] == tok
            assert lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-5)


def test_generate_returns_logprobs_for_every_token(engine):
    (out,) = engine.generate([PROMPTS[0]], greedy(5, logprobs=2))
    assert len(out.logprobs) == len(out.token_ids) == 5


# -- abort -------------------------------------------------------------------------------------
def test_abort_mid_generation_frees_every_block(engine):
    rid = engine.add_request(PROMPTS[1] * 4, greedy(50, n=2))
    other = engine.add_request(PROMPTS[0], greedy(50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    outs = engine.abort(rid)
    assert sorted(o.index for o in outs) == [0, 1]
    for o in outs:
        assert o.finished and o.finish_reason == "abort"
        assert 0 < len(o.token_ids) < 50 and o.metrics is not None
    assert engine.abort(rid) == []  # idempotent
    (o,) = engine.abort(other)
    assert o.finish_reason == "abort"
    assert engine.abort("no-such-request") == []
    assert_no_leak(engine)
    assert engine.step() == []


def test_abort_before_scheduling(engine):
    rid = engine.add_request(PROMPTS[0], greedy())
    (o,) = engine.abort(rid)
    assert o.finish_reason == "abort" and o.token_ids == [] and o.text == ""
    assert_no_leak(engine)


# -- limits and bad requests -------------------------------------------------------------------
def test_context_length_is_enforced(ckpt):
    eng = make_engine(ckpt, max_model_len=64)
    with pytest.raises(ContextLengthExceeded, match="64") as e:
        eng.add_request(list(range(100, 170)), SamplingParams(max_tokens=1))
    assert e.value.code == "CONTEXT_LENGTH_EXCEEDED"
    with pytest.raises(ContextLengthExceeded) as e:
        eng.add_request(list(range(100, 140)), SamplingParams(max_tokens=25))
    assert e.value.code == "CONTEXT_LENGTH_EXCEEDED"
    assert not eng.has_unfinished()
    # Exactly at the limit is fine and runs to the end.
    (out,) = eng.generate([list(range(100, 140))], greedy(24))
    assert len(out.token_ids) == 24 and out.finish_reason == "length"
    assert_no_leak(eng)


def test_request_larger_than_the_whole_cache(ckpt):
    probe = make_engine(ckpt)
    per_block = probe.model.kv_bytes_per_token() * 16
    eng = make_engine(ckpt, kv_cache_memory_gb=4.5 * per_block / 2**30)
    assert eng.num_blocks == 4  # watermark 1: 48 usable tokens
    with pytest.raises(KVBudgetImpossible, match="48") as e:
        eng.add_request(list(range(100, 140)), SamplingParams(max_tokens=9))
    assert e.value.code == "RESOURCE_EXHAUSTED"
    (out,) = eng.generate([list(range(100, 140))], greedy(8))  # 48: just fits
    assert len(out.token_ids) == 8
    assert_no_leak(eng)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ([], "empty"),
        ([5, 49152], r"prompt\[1\]"),
        ([-1], r"prompt\[0\]"),
        ([3, True], r"prompt\[1\]"),
        ([3.0], r"prompt\[0\]"),
    ],
)
def test_bad_prompts_are_request_errors(engine, prompt, match):
    with pytest.raises(RequestError, match=match) as e:
        engine.add_request(prompt, greedy())
    assert e.value.code == "INVALID_ARGUMENT"
    assert not engine.has_unfinished()


def test_duplicate_request_id(engine):
    engine.add_request(PROMPTS[0], greedy(3), request_id="dup")
    with pytest.raises(RequestError, match="dup"):
        engine.add_request(PROMPTS[1], greedy(3), request_id="dup")
    got = run_streaming(engine)
    assert list(got) == [("dup", 0)] and len(got[("dup", 0)]["final"].token_ids) == 3
    # Once finished, the id may be used again.
    engine.add_request(PROMPTS[1], greedy(2), request_id="dup")
    assert len(run_streaming(engine)[("dup", 0)]["final"].token_ids) == 2


def test_automatic_ids_never_collide_with_explicit_ones(engine):
    nxt = f"req-{int(engine.add_request(PROMPTS[0], greedy(1)).split('-')[1]) + 1}"
    engine.add_request(PROMPTS[0], greedy(1), request_id=nxt)
    try:
        engine.add_request(PROMPTS[0], greedy(1))
    finally:
        run_streaming(engine)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.5),
        dict(temperature=5.0),
        dict(top_p=0.0),
        dict(top_k=-3),
        dict(max_tokens=0),
        dict(n=0),
        dict(logprobs=21),
        dict(stop=[""]),
        dict(seed=1.5),
    ],
)
def test_invalid_sampling_params(kw):
    (name,) = kw
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_bad_priority_is_rejected_at_add(engine):
    engine.add_request(PROMPTS[0], greedy(1))
    try:
        with pytest.raises((RequestError, ValueError), match="priority"):
            engine.add_request(PROMPTS[0], greedy(1), priority="high")
    finally:
        for rid in list(engine._requests):
            engine.abort(rid)


def test_generate_with_a_bad_prompt_adds_nothing(engine):
    try:
        with pytest.raises(RequestError):
            engine.generate([PROMPTS[0], ""], greedy(2))
        assert not engine.has_unfinished()
    finally:
        for rid in list(engine._requests):
            engine.abort(rid)


# -- scheduling through the engine -------------------------------------------------------------
def test_priority_orders_requests_when_one_slot(ckpt):
    eng = make_engine(ckpt, max_num_seqs=1)
    eng.add_request(PROMPTS[0], greedy(3), request_id="low", priority=2)
    eng.add_request(PROMPTS[1], greedy(3), request_id="mid", priority=1)
    eng.add_request(PROMPTS[2], greedy(3), request_id="high", priority=0)
    order = []
    while eng.has_unfinished():
        outs = eng.step()
        assert len({o.request_id for o in outs}) <= 1
        order += [o.request_id for o in outs if o.finished]
    assert order == ["high", "mid", "low"]
    assert_no_leak(eng)


def test_max_num_seqs_per_step(ckpt):
    eng = make_engine(ckpt, max_num_seqs=2)
    for i in range(5):
        eng.add_request(PROMPTS[i % 3], greedy(4))
    finished = 0
    while eng.has_unfinished():
        outs = eng.step()
        assert len(outs) <= 2 and len(eng.scheduler.running) <= 2
        finished += sum(o.finished for o in outs)
    assert finished == 5
    assert_no_leak(eng)


def test_tiny_cache_preempts_and_still_matches(ckpt, engine):
    """Preemption (recompute) must not change greedy output."""
    prompts = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(4)]
    expected = [o.token_ids for o in engine.generate(prompts, greedy(20))]
    per_block = engine.model.kv_bytes_per_token() * 16
    eng = make_engine(ckpt, kv_cache_memory_gb=6.5 * per_block / 2**30)
    outs = eng.generate(prompts, greedy(20))
    assert [o.token_ids for o in outs] == expected
    assert eng.scheduler.num_preemptions > 0
    assert sum(o.metrics.evict_count for o in outs) == eng.scheduler.num_preemptions
    assert_no_leak(eng)


def test_priority_preemption_in_the_engine(ckpt):
    per_block = make_engine(ckpt).model.kv_bytes_per_token() * 16
    eng = make_engine(ckpt, kv_cache_memory_gb=3.5 * per_block / 2**30)
    assert eng.num_blocks == 3
    eng.add_request(list(range(100, 115)), greedy(10), priority=5)
    eng.step()
    eng.add_request(list(range(200, 216)), greedy(10), priority=0)
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert len(outs) == 2 and all(len(o.token_ids) == 10 for o in outs)


# -- streaming and metrics ---------------------------------------------------------------------
def test_streamed_deltas_concatenate_to_the_final_text(engine, reference):
    ids, text = reference
    stop = engine.tokenizer.decode(ids[5:7]).strip()[:4]
    engine.add_request(PROMPTS[0], greedy(20))
    engine.add_request(PROMPTS[1], greedy(20, stop=[stop]))
    engine.add_request(PROMPTS[2], sampled(5, n=2))
    got = run_streaming(engine)
    assert len(got) == 4
    for g in got.values():
        final = g["final"]
        assert "".join(g["deltas"]) == final.text
        assert g["ids"] == final.token_ids
        if final.finish_reason == "length":
            assert final.text == engine.tokenizer.decode(final.token_ids)


def test_stream_holds_back_a_stop_prefix_across_an_empty_delta(engine, monkeypatch):
    tok = engine.tokenizer
    pieces = [tok.encode(s, add_special_tokens=False) for s in ("Hello", " wor", "ld", "!")]
    assert all(len(p) == 1 for p in pieces)
    im_start = tok.hf.convert_tokens_to_ids("<|im_start|>")  # special: decodes to ""
    script = [pieces[0][0], pieces[1][0], im_start, pieces[2][0], pieces[3][0]]
    assert tok.decode(script) == "Hello world!"
    it = iter(script)
    monkeypatch.setattr(
        engine.runner.sampler,
        "sample",
        lambda logits, batch: SamplerOutput(torch.tensor([next(it)] * batch.num_seqs)),
    )
    engine.add_request(PROMPTS[0], greedy(5, stop=["world"]))
    (g,) = run_streaming(engine).values()
    assert g["final"].text == "Hello "
    assert "".join(g["deltas"]) == "Hello "


def test_metrics_are_sane(engine):
    long_prompt = PROMPTS[1] * 6
    (first,) = engine.generate([long_prompt], greedy(6))
    (second,) = engine.generate([long_prompt], greedy(6))
    for out in (first, second):
        m = out.metrics
        assert m.ttft_ms > 0 and m.tpot_ms > 0 and m.tbt_ms > 0 and m.tbt_p99_ms >= m.tbt_ms
        assert m.e2e_ms >= m.ttft_ms >= m.queue_ms >= 0
        assert m.throughput_tps > 0
        assert m.prompt_tokens == out.num_prompt_tokens and m.output_tokens == 6
        assert m.prompt_tokens <= m.kv_used_tokens <= m.prompt_tokens + m.output_tokens
        assert m.kv_used_bytes >= m.kv_used_tokens * engine.model.kv_bytes_per_token()
        assert 0.0 <= m.prefix_hit_rate <= 1.0
        assert m.evict_count == 0 and m.evict_ms == 0
        assert m.peak_mem_mb > 0
    assert second.metrics.prefix_hit_rate > 0  # the same long prompt again hits the cache
    assert second.token_ids == first.token_ids
    (one,) = engine.generate([PROMPTS[0]], greedy(1))
    assert one.metrics.tpot_ms == 0 and one.metrics.ttft_ms > 0
    s = engine.stats()
    assert s["kv_blocks_used"] == 0 and 0.0 <= s["prefix_hit_rate"] <= 1.0
    assert s["requests_finished"] >= 3 and s["generated_tokens"] >= 13
