"""Sampler: each transformation against a slow reference, sampling statistics, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from sagellm.runtime.params import SamplingParams
from sagellm.runtime.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    make_generators,
)

sampler = Sampler()


def make_batch(params, outputs=None, prompts=None, gens=None, device="cpu"):
    n = len(params)
    return SamplingBatch.build(
        params,
        outputs if outputs is not None else [[] for _ in range(n)],
        prompts if prompts is not None else [[] for _ in range(n)],
        gens if gens is not None else [None] * n,
        device,
    )


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- greedy and logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(7, 301, generator=gen(0)).to(dtype)
    before = logits.clone()
    out = sampler.sample(logits, make_batch([SamplingParams()] * 7))
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None
    assert torch.equal(logits, before)


def test_greedy_logprobs_and_top_logprobs():
    logits = torch.randn(4, 50, generator=gen(1)).to(torch.bfloat16)
    params = [SamplingParams(logprobs=k) for k in (0, 3, None, 5)]
    out = sampler.sample(logits, make_batch(params))
    ref = torch.log_softmax(logits.double(), -1)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), ref.max(-1).values, atol=1e-5, rtol=0)
    values, ids = out.top_logprobs
    assert values.shape == ids.shape == (4, 5)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    torch.testing.assert_close(values.double(), ref.gather(1, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(values.double(), ref.topk(5, -1).values, atol=1e-5, rtol=0)
    assert torch.equal(ids[:, 0], out.token_ids)


def test_logprobs_are_processed_distribution_of_sampled_rows():
    # Processed = after penalties and temperature, before top-k/top-p truncation.
    logits = torch.randn(3, 40, generator=gen(2))
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=4, seed=1),
        SamplingParams(temperature=1.3, top_p=0.5, presence_penalty=1.0, logprobs=2),
        SamplingParams(logprobs=1, frequency_penalty=0.5),  # greedy: temperature counts as 1
    ]
    outputs = [[1, 2], [3, 3, 4], [5, 5]]
    batch = make_batch(params, outputs=outputs, gens=[gen(1), None, None])
    out = sampler.sample(logits, batch)
    processed = apply_penalties(logits.clone(), batch) / torch.tensor([0.5, 1.3, 1.0])[:, None]
    ref = torch.log_softmax(processed.double(), -1)
    torch.testing.assert_close(
        out.logprobs.double(), ref.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-5, rtol=0
    )
    values, ids = out.top_logprobs
    assert values.shape == (3, 4)
    torch.testing.assert_close(values.double(), ref.topk(4, -1).values, atol=1e-5, rtol=0)
    assert torch.equal(ids, ref.topk(4, -1).indices)
    assert out.token_ids[2] == processed[2].argmax()


# ---------------------------------------------------------------- distributions


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.99th percentile of chi-square with 5 degrees of freedom: a correct sampler fails ~1e-4
# of the time, and the fixed seeds make the outcome deterministic.
CHI2_5DOF_P9999 = 25.74


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_matches_softmax(seeded):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    temperature, draws = 0.7, 6000
    torch.manual_seed(11)
    gens = [gen(1000 + i) for i in range(draws)] if seeded else None
    batch = make_batch([SamplingParams(temperature=temperature)] * draws, gens=gens)
    out = sampler.sample(logits.expand(draws, -1).to(torch.float16), batch)
    counts = torch.bincount(out.token_ids, minlength=6).double()
    probs = torch.softmax(logits.double() / temperature, -1)
    assert chi_square(counts, probs) < CHI2_5DOF_P9999
    # and a wrong temperature is detectable by the same test
    assert chi_square(counts, torch.softmax(logits.double(), -1)) > CHI2_5DOF_P9999


def test_top_k_never_outside_k_largest():
    vocab, rows = 97, 48
    logits = torch.randn(rows, vocab, generator=gen(3))
    ks = [1 + (i * 7) % 12 for i in range(rows)]
    ks[5] = 500  # larger than the vocabulary: everything allowed
    params = [SamplingParams(temperature=2.0, top_k=k) for k in ks]
    batch = make_batch(params)
    allowed = torch.zeros(rows, vocab, dtype=torch.bool)
    for i, k in enumerate(ks):
        allowed[i, logits[i].topk(min(k, vocab)).indices] = True
    torch.manual_seed(3)
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    for _ in range(60):
        ids = sampler.sample(logits, batch).token_ids
        seen[torch.arange(rows), ids] = True
    assert not (seen & ~allowed).any()
    assert seen[ks.index(12)].sum() > 6  # sampling, not argmax


def nucleus_reference(logits_row: torch.Tensor, p: float) -> set[int]:
    probs = torch.softmax(logits_row.double(), -1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for t in order:
        kept.add(t)
        mass += float(probs[t])
        if mass >= p:
            break
    return kept


def test_top_p_never_outside_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    logits = probs.log()
    cases = {0.45: {1}, 0.75: {1, 3}, 0.85: {1, 3, 4}, 1.0: set(range(6))}
    for p, nucleus in cases.items():
        assert nucleus_reference(logits, p) == nucleus
        batch = make_batch([SamplingParams(temperature=1.0, top_p=p)] * 4000)
        torch.manual_seed(5)
        ids = sampler.sample(logits.expand(4000, -1), batch).token_ids
        assert set(ids.tolist()) == nucleus
        if p == 0.75:  # renormalised within the nucleus: 0.5 : 0.3
            frac = (ids == 1).double().mean().item()
            assert abs(frac - 0.625) < 0.03


def test_top_k_top_p_function_against_reference():
    rows, vocab = 16, 64
    logits = torch.randn(rows, vocab, generator=gen(4)) * 2
    top_k = torch.tensor([0, 1, 5, 20, 64, 100, 0, 3] * 2)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.95, 0.99, 0.1, 1.0] * 2)
    for use_k, use_p in [(True, False), (False, True), (True, True)]:
        out = apply_top_k_top_p(
            logits.clone(),
            top_k if use_k else None,
            int(top_k.max()),
            top_p if use_p else None,
        )
        for i in range(rows):
            row = logits[i].clone()
            k = int(top_k[i])
            if use_k and k > 0:
                row[row < row.topk(min(k, vocab)).values[-1]] = -math.inf
            kept = nucleus_reference(row, float(top_p[i])) if use_p else set(range(vocab))
            kept &= set(torch.nonzero(row > -math.inf).flatten().tolist())
            got = set(torch.nonzero(out[i] > -math.inf).flatten().tolist())
            assert got == kept, (use_k, use_p, i)
            assert torch.equal(out[i][list(got)], logits[i][list(got)])


def test_top_p_wide_vocab_candidates_and_fallback():
    """Peaked rows find their nucleus among the first candidates; flat rows need a full sort."""
    vocab = 3000
    logits = torch.randn(6, vocab, generator=gen(12))
    logits[:3] *= 8  # peaked: nucleus of a few tokens
    logits[3:] *= 0.1  # flat: nucleus of most of the vocabulary
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.9, 0.5, 0.99])
    top_k = torch.tensor([0, 0, 2000, 0, 2500, 0])
    for k in (None, top_k):
        out = apply_top_k_top_p(logits.clone(), k, int(top_k.max()) if k is not None else 0, top_p)
        for i in range(6):
            row = logits[i].clone()
            if k is not None and int(k[i]) > 0:
                row[row < row.topk(int(k[i])).values[-1]] = -math.inf
            kept = nucleus_reference(row, float(top_p[i]))
            got = set(torch.nonzero(out[i] > -math.inf).flatten().tolist())
            assert got == kept, i
            assert (len(got) < 256) == (i < 3)


def test_min_p():
    logits = torch.randn(8, 30, generator=gen(6)) * 3
    min_p = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0, 0.2])
    out = apply_min_p(logits.clone(), min_p)
    probs = torch.softmax(logits.double(), -1)
    for i in range(8):
        keep = probs[i] >= float(min_p[i]) * probs[i].max()
        assert torch.equal(out[i] > -math.inf, keep)
        assert torch.equal(out[i][keep], logits[i][keep])
    # and sampling respects it, on the temperature-scaled distribution
    params = [SamplingParams(temperature=1.5, min_p=float(p)) for p in min_p]
    allowed = apply_min_p(logits / 1.5, min_p) > -math.inf
    assert not torch.equal(allowed, out > -math.inf)
    torch.manual_seed(6)
    for _ in range(30):
        ids = sampler.sample(logits, make_batch(params)).token_ids
        assert bool(allowed.gather(1, ids[:, None]).all())


# ---------------------------------------------------------------- penalties


def penalties_reference(logits, params, outputs, prompts):
    out = logits.clone().double()
    for i, p in enumerate(params):
        seen = set(outputs[i]) | set(prompts[i])
        for t in seen:
            x = out[i, t].item()
            out[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(outputs[i]):
            out[i, t] -= p.frequency_penalty * outputs[i].count(t) + p.presence_penalty
    return out


def test_penalties_against_reference():
    vocab = 40
    logits = torch.randn(5, vocab, generator=gen(7)) * 3
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8, presence_penalty=0.7, frequency_penalty=-0.4),
        SamplingParams(),  # no penalty: its tokens must be ignored
        SamplingParams(presence_penalty=-1.5, frequency_penalty=1.1, temperature=1.0),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.3),
    ]
    outputs = [[1, 1, 2], [3, 3, 3, 9, 39], [1, 2, 3], [0, 0, 5, 6, 6, 6], []]
    prompts = [[4, 5, 1], [7], [8, 9], [10, 0], [11, 11, 12, 39]]
    batch = make_batch(params, outputs=outputs, prompts=prompts)
    got = apply_penalties(logits.clone(), batch)
    ref = penalties_reference(logits, params, outputs, prompts)
    ref[2] = logits[2].double()
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-6)
    assert not torch.equal(got, logits)


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    plain = sampler.sample(logits, make_batch([SamplingParams()])).token_ids
    penalised = sampler.sample(
        logits, make_batch([SamplingParams(repetition_penalty=1.5)], outputs=[[0]])
    ).token_ids
    assert plain.item() == 0 and penalised.item() == 1


def test_penalty_token_out_of_vocab_raises():
    batch = make_batch([SamplingParams(frequency_penalty=1.0)], outputs=[[3, 10]])
    with pytest.raises(ValueError, match="token id 10 is out of range"):
        sampler.sample(torch.zeros(1, 10), batch)
    with pytest.raises(ValueError, match=r"output_token_ids\[0\] contains -2"):
        make_batch([SamplingParams(frequency_penalty=1.0)], outputs=[[3, -2]])


# ---------------------------------------------------------------- seeds and mixed batches


def run_steps(seed_rows, logits_fn, steps):
    """seed_rows: list of (params, generator); logits_fn(step) -> [rows, vocab]."""
    params = [p for p, _ in seed_rows]
    gens = [g for _, g in seed_rows]
    return torch.stack(
        [
            sampler.sample(logits_fn(s), make_batch(params, gens=gens)).token_ids
            for s in range(steps)
        ]
    )


def test_seeded_reproducible_regardless_of_batch():
    vocab, steps = 500, 6
    target_logits = [torch.randn(vocab, generator=gen(100 + s)) for s in range(steps)]
    target = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, seed=42)

    alone = run_steps(
        [(target, make_generators(42, 1, "cpu")[0])],
        lambda s: target_logits[s][None],
        steps,
    )[:, 0]

    others = [
        (SamplingParams(temperature=0.8, seed=7), gen(7)),
        (SamplingParams(), None),
        (SamplingParams(temperature=1.2, min_p=0.1), None),
    ]
    for pos in (0, 2, 3):
        rows = others[:pos] + [(target, make_generators(42, 1, "cpu")[0])] + others[pos:]

        def logits_fn(s, pos=pos):
            batch_logits = torch.randn(4, vocab, generator=gen(s + 10 * pos))
            batch_logits[pos] = target_logits[s]
            return batch_logits

        torch.manual_seed(pos)  # unseeded rows draw differently each time
        mixed = run_steps(rows, logits_fn, steps)[:, pos]
        assert torch.equal(mixed, alone), pos
    other_seed = run_steps([(target, gen(43))], lambda s: target_logits[s][None], steps)[:, 0]
    assert not torch.equal(other_seed, alone)


def test_make_generators():
    gens = make_generators(5, 3, "cpu")
    draws = [torch.rand(4, generator=g) for g in gens]
    assert torch.equal(draws[0], torch.rand(4, generator=gen(5)))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    again = make_generators(5, 3, "cpu")
    assert torch.equal(torch.rand(4, generator=again[2]), draws[2])
    assert make_generators(None, 2, "cpu") == [None, None]
    make_generators(-1, 2, "cpu")  # negative seeds are valid request seeds


def test_mixed_greedy_and_sampled_batch():
    rows, vocab = 8, 64
    logits = torch.randn(rows, vocab, generator=gen(8))
    greedy_rows = {0, 3, 4, 7}
    params = [
        SamplingParams() if i in greedy_rows else SamplingParams(temperature=2.0)
        for i in range(rows)
    ]
    batch = make_batch(params)
    torch.manual_seed(8)
    draws = torch.stack([sampler.sample(logits, batch).token_ids for _ in range(20)])
    argmax = logits.argmax(-1)
    for i in range(rows):
        if i in greedy_rows:
            assert bool((draws[:, i] == argmax[i]).all())
        else:
            assert len(set(draws[:, i].tolist())) > 3


def test_fully_masked_row_picks_a_valid_token():
    logits = torch.full((3, 10), -math.inf)
    logits[1, 6] = 0.5  # one finite logit: must be chosen
    logits[2] = torch.linspace(-1, 1, 10)
    params = [
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.9, top_k=2),
    ]
    torch.manual_seed(9)
    for _ in range(10):
        ids = sampler.sample(logits, make_batch(params)).token_ids
        assert ids[0].item() == 0 and ids[1].item() == 6 and ids[2].item() in (8, 9)
    greedy = sampler.sample(logits, make_batch([SamplingParams()] * 3)).token_ids
    assert greedy.tolist() == [0, 6, 9]


def test_bad_inputs():
    batch = make_batch([SamplingParams(temperature=1.0, seed=1)] * 2, gens=[gen(1), None])
    with pytest.raises(ValueError, match="logits has 3 rows"):
        sampler.sample(torch.zeros(3, 5), batch)
    with pytest.raises(ValueError, match="2-D float"):
        sampler.sample(torch.zeros(5), batch)
    with pytest.raises(ValueError, match="2-D float"):
        sampler.sample(torch.zeros(2, 5, dtype=torch.int64), batch)
    with pytest.raises(ValueError, match=r"len\(generators\) = 1"):
        make_batch([SamplingParams()] * 2, gens=[None])
    with pytest.raises(ValueError, match=r"len\(output_token_ids\) = 3"):
        make_batch([SamplingParams()] * 2, outputs=[[], [], []])
    with pytest.raises(ValueError, match="params_list is empty"):
        make_batch([])
