"""The engine on CUDA: greedy parity with the CPU fp32 path (eager and with decode graphs, batch
sizes crossing buckets, prefix-cache hits, preemption, mixed prefill + decode steps), bf16 logits
against transformers, graph replay against the same padded steps run eagerly, seeded sampling,
and no host synchronisation inside a step but the one that reads the sampled tokens.

The first tests run everywhere: they drive the padded decode path (what a graph replays) through
the CPU kernels, so the padding rows are checked against the real index validation. The rest need
a GPU and the CUDA kernels, and skip without them.
"""

from __future__ import annotations

import random

import pytest
import torch

from sagellm import ops
from sagellm.runtime import model_runner
from sagellm.runtime.config import EngineConfig
from sagellm.runtime.cuda_graphs import DecodeGraphs, graph_buckets
from sagellm.runtime.engine import LLMEngine
from sagellm.runtime.params import SamplingParams
from tests.tiny_models import ARCHS, load_reference_tokenizer, write_tiny_checkpoint

CUDA = bool(ops.build_info()["cuda"]) and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")

NUM_PROMPTS = 40
# Output lengths 1..20: as requests finish, the decode batch shrinks through 40, 32, 24, ... 1.
MAX_TOKENS = [1 + (i * 7) % 20 for i in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_reference_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rng = random.Random(11)
    vocab = len(tokenizer)
    shared = [rng.randrange(vocab) for _ in range(40)]
    out = []
    for i in range(NUM_PROMPTS):
        if i % 5 == 0:  # a shared 40-token prefix: prefix-cache hits within the batch
            out.append(shared + [rng.randrange(vocab) for _ in range(rng.randint(1, 10))])
        else:
            out.append([rng.randrange(vocab) for _ in range(rng.randint(1, 70))])
    return out


def make_engine(folder, device: str, dtype: str = "float32", **cfg) -> LLMEngine:
    cfg.setdefault("kv_cache_memory_gb", 0.05)
    if device == "cpu":
        cfg.setdefault("num_threads", min(8, torch.get_num_threads()))
    return LLMEngine(
        EngineConfig(model=str(folder), dtype=dtype, device=device, load_progress=False, **cfg)
    )


def generate(engine: LLMEngine, prompts, max_tokens=MAX_TOKENS, **params):
    sps = [SamplingParams(max_tokens=n, ignore_eos=True, **params) for n in max_tokens]
    return engine.generate(prompts, sps)


def token_ids(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def assert_no_leak(engine: LLMEngine) -> None:
    assert engine.block_manager.num_used_blocks == 0, "KV blocks still held"
    assert not engine.has_unfinished()


# -- the padded decode path on the CPU ---------------------------------------------------------
def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(3) == [1, 2, 3]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_buckets(200)[-4:] == [128, 160, 192, 200]
    assert graph_buckets(512)[-5:] == [256, 320, 384, 448, 512]
    with pytest.raises(ValueError, match="max_batch = 0"):
        graph_buckets(0)


def test_bucket_lookup(tmp_path, tokenizer):
    folder = write_tiny_checkpoint("llama", tmp_path / "llama", tokenizer)
    engine = make_engine(folder, "cpu", num_threads=1)
    graphs = DecodeGraphs(engine.model, engine.runner.kv_caches, 24, 4, torch.device("cpu"))
    assert [graphs.bucket(n) for n in (1, 3, 5, 16, 17, 24, 25)] == [1, 4, 8, 16, 24, 24, None]
    with pytest.raises(RuntimeError, match="CUDA device"):
        graphs.capture()


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(max_num_batched_tokens=2),  # decode-only steps whose 1-token chunk does not sample
        dict(kv_cache_memory_gb="tiny"),  # preemption and recompute
    ],
    ids=["default", "budget-2", "preemption"],
)
def test_padded_decode_matches_packed_on_cpu(tmp_path, tokenizer, prompts, variant, monkeypatch):
    folder = write_tiny_checkpoint("qwen2", tmp_path / "qwen2", tokenizer)
    cfg = dict(variant, num_threads=1)
    some, lens = prompts[:12], MAX_TOKENS[:12]
    if cfg.get("kv_cache_memory_gb") == "tiny":
        probe = make_engine(folder, "cpu", num_threads=1)
        cfg["kv_cache_memory_gb"] = probe.model.kv_bytes_per_token() * 16 * 9 / 2**30
    if "kv_cache_memory_gb" in cfg:  # long enough outputs that running sequences must grow
        lens = [20] * len(some)
    plain = make_engine(folder, "cpu", **cfg)
    expected = generate(plain, some, lens, logprobs=3)
    padded = make_engine(folder, "cpu", **cfg)
    padded.runner.setup_decode_graphs(8, padded.max_model_len, capture=False)
    gathered = []
    stage = model_runner.stage

    def spy(*args, **kwargs):
        step = stage(*args, **kwargs)
        if kwargs.get("pad_to") is not None:
            gathered.append(not step.logits_are_prefix)
        return step

    monkeypatch.setattr(model_runner, "stage", spy)
    got = generate(padded, some, lens, logprobs=3)
    assert token_ids(got) == token_ids(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in g.logprobs]),
            torch.tensor([lp.logprob for lp in e.logprobs]),
            atol=1e-5,
            rtol=1e-5,
        )
    assert padded.runner.num_graph_steps > 0 and padded.runner.num_graph_replays == 0
    if "tiny" in variant.values():
        assert padded.scheduler.num_preemptions > 0
    if "max_num_batched_tokens" in variant:  # some padded steps sampled only part of their rows
        assert any(gathered)
    assert_no_leak(padded)


# -- CUDA --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory, tokenizer, prompts):
    """(arch, folder, the CPU fp32 engine's 20 greedy tokens for every prompt); a request for
    fewer tokens must give a prefix of them."""
    if not CUDA:
        pytest.skip("needs a GPU and the CUDA kernels")
    folder = write_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), tokenizer)
    cpu = make_engine(folder, "cpu")
    return request.param, folder, token_ids(generate(cpu, prompts, [20] * len(prompts)))


def prefixes(full: list[list[int]], lens=MAX_TOKENS) -> list[list[int]]:
    return [ids[:n] for ids, n in zip(full, lens)]


@needs_cuda
@pytest.mark.parametrize(
    "mode",
    [dict(enforce_eager=True), dict(), dict(cuda_graph_max_batch=16)],
    ids=["eager", "graphs", "graphs-to-16"],
)
def test_fp32_greedy_matches_cpu(checkpoint, prompts, mode):
    arch, folder, full = checkpoint
    expected = prefixes(full)
    engine = make_engine(folder, "cuda", **mode)
    assert token_ids(generate(engine, prompts)) == expected, f"{arch} {mode}"
    replays = engine.stats()["cuda_graph_replays"]
    if mode.get("enforce_eager"):
        assert replays == 0 and engine.runner.graphs is None
    else:
        assert replays > 0, "decode steps were meant to replay graphs"
        assert engine.runner.num_eager_steps > 0  # prefill and mixed steps
    if "cuda_graph_max_batch" in mode:
        assert engine.runner.graphs.buckets[-1] == 16
    assert_no_leak(engine)


@needs_cuda
def test_fp32_prefix_hits_and_preemption_with_graphs(checkpoint, prompts):
    arch, folder, full = checkpoint
    expected = prefixes(full)
    engine = make_engine(folder, "cuda")
    assert token_ids(generate(engine, prompts)) == expected
    again = generate(engine, prompts)
    assert token_ids(again) == expected, arch
    assert engine.block_manager.prefix_hit_rate() > 0
    assert all(o.metrics.prefix_hit_rate > 0 for o in again if o.num_prompt_tokens > 16)

    per_block = engine.model.kv_bytes_per_token() * 16
    tiny = make_engine(folder, "cuda", kv_cache_memory_gb=per_block * 9 / 2**30)
    outs = generate(tiny, prompts[:12], [20] * 12)  # running sequences must grow
    assert token_ids(outs) == full[:12], arch
    assert tiny.scheduler.num_preemptions > 0, "the cache was meant to be too small"
    assert tiny.stats()["cuda_graph_replays"] > 0
    assert_no_leak(tiny)


@needs_cuda
def test_fp32_mixed_prefill_and_decode_steps(checkpoint, prompts):
    """Requests arrive while others decode: steps mix new prompts with running decodes."""
    arch, folder, full = checkpoint
    expected = prefixes(full)
    engine = make_engine(folder, "cuda")
    mixed = 0
    schedule = engine.scheduler.schedule

    def spy():
        nonlocal mixed
        batch = schedule()
        n = batch.num_new_tokens
        mixed += bool(n) and max(n) > 1 and min(n) == 1  # a prompt chunk beside decodes
        return batch

    engine.scheduler.schedule = spy
    got: dict[str, list[int]] = {}
    rid_of: dict[str, int] = {}
    pending = list(range(12))
    while pending or engine.has_unfinished():
        for _ in range(2):  # two arrivals every three steps
            if pending:
                i = pending.pop(0)
                sp = SamplingParams(max_tokens=MAX_TOKENS[i], ignore_eos=True)
                rid_of[engine.add_request(prompts[i], sp)] = i
        for _ in range(3):
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.token_ids
    assert {rid_of[r]: ids for r, ids in got.items()} == {i: expected[i] for i in range(12)}
    assert mixed > 0, "no step mixed a prefill with decodes"
    assert engine.stats()["cuda_graph_replays"] > 0
    assert_no_leak(engine)


@needs_cuda
def test_bf16_graph_replay_equals_the_same_steps_run_eagerly(checkpoint, prompts):
    """A replayed graph gives exactly what the same padded step gives eagerly. (Against the
    unpadded eager path bf16 tokens may legitimately differ: a different batch size can pick a
    different GEMM kernel, and a tenth of these models' top-2 logit gaps are under one bf16 ulp.)"""
    arch, folder, _ = checkpoint
    graphs = make_engine(folder, "cuda", dtype="bfloat16")
    eager = make_engine(folder, "cuda", dtype="bfloat16", enforce_eager=True)
    eager.runner.setup_decode_graphs(graphs.runner.graphs.max_batch, eager.max_model_len, False)
    a = generate(graphs, prompts, logprobs=5)
    b = generate(eager, prompts, logprobs=5)
    assert token_ids(a) == token_ids(b), arch
    for x, y in zip(a, b):
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in x.logprobs]),
            torch.tensor([lp.logprob for lp in y.logprobs]),
            atol=1e-3,
            rtol=0,
        )
    assert graphs.stats()["cuda_graph_replays"] > 0
    assert eager.stats()["cuda_graph_replays"] == 0 and eager.runner.num_graph_steps > 0


def _hf(folder, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return model.to("cuda").eval()


@needs_cuda
def test_bf16_logits_close_to_transformers(checkpoint, prompts):
    """Tolerance: our bf16 logits are no further from the fp32 logits (transformers, fp32 on the
    GPU) than 3x transformers' own bf16 error plus 0.03 (one bf16 ulp at |logit| = 4), in max
    abs difference over the vocabulary. Checked for the prefill's logits and for the next decode
    step's (a graph replay), on the context our engine generated."""
    arch, folder, _ = checkpoint
    engine = make_engine(folder, "cuda", dtype="bfloat16")
    seen: list[torch.Tensor] = []
    sample = engine.runner.sampler.sample

    def spy(logits, batch):
        seen.append(logits.float().cpu())
        return sample(logits, batch)

    engine.runner.sampler.sample = spy
    hf16, hf32 = _hf(folder, torch.bfloat16), _hf(folder, torch.float32)
    for prompt in prompts[:8]:
        seen.clear()
        (out,) = engine.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))
        ours = torch.cat(seen)  # [2, vocab]: after the prompt, after the first new token
        ids = torch.tensor([prompt + out.token_ids[:1]], device="cuda")
        with torch.inference_mode():
            ref = hf32(ids).logits[0, -2:].float().cpu()
            theirs = hf16(ids).logits[0, -2:].float().cpu()
        err_ours = (ours - ref).abs().max().item()
        err_hf = (theirs - ref).abs().max().item()
        assert err_ours <= 3 * err_hf + 0.03, (
            f"{arch}: max |ours - fp32| = {err_ours:.4f}, transformers bf16: {err_hf:.4f}"
        )
    assert engine.stats()["cuda_graph_replays"] > 0


@needs_cuda
def test_seeded_sampling_on_cuda_is_reproducible(checkpoint, prompts):
    arch, folder, _ = checkpoint
    engine = make_engine(folder, "cuda")
    sp = dict(max_tokens=12, ignore_eos=True, temperature=0.9, top_p=0.9, top_k=50)
    alone = engine.generate([prompts[3]], SamplingParams(seed=7, **sp))[0].token_ids
    crowd = engine.generate(
        prompts[:6], [SamplingParams(seed=7 if i == 3 else 100 + i, **sp) for i in range(6)]
    )
    assert crowd[3].token_ids == alone, "a seeded request must not depend on its batch"
    other = engine.generate([prompts[3]], SamplingParams(seed=8, **sp))[0].token_ids
    assert other != alone
    rid = engine.add_request(prompts[0], SamplingParams(seed=1, **sp))
    assert engine._requests[rid][0].generator.device.type == "cuda"
    engine.abort(rid)
    assert_no_leak(engine)


@needs_cuda
def test_a_step_waits_for_the_device_only_to_read_its_tokens(checkpoint, prompts):
    """torch's sync debug mode raises on any synchronising CUDA call (.item(), .tolist(), a copy
    to pageable memory, nonzero ...); the one wait a step makes is on an event."""
    arch, folder, _ = checkpoint
    engine = make_engine(folder, "cuda")
    generate(engine, prompts[:4], max_tokens=[4] * 4)  # lazy initialisation, not checked
    kinds = [
        dict(),
        dict(temperature=0.8, top_p=0.9, top_k=20, seed=3),
        dict(temperature=1.0, min_p=0.05),
        dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
        dict(logprobs=4),
    ]
    for i, prompt in enumerate(prompts[:15]):
        engine.add_request(prompt, SamplingParams(max_tokens=10, ignore_eos=True, **kinds[i % 5]))
    torch.cuda.set_sync_debug_mode("error")
    try:
        while engine.has_unfinished():
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.stats()["cuda_graph_replays"] > 0
    assert_no_leak(engine)
