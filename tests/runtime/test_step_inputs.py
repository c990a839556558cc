"""Packing a step into the reusable host buffers: field by field against a plain list-based
reference, for prefill chunks, decodes, prefix hits, padding to a graph bucket, buffer growth and
block lists that grow or are replaced (preemption)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sagellm.runtime.params import SamplingParams
from sagellm.runtime.scheduler import ScheduledBatch
from sagellm.runtime.sequence import Sequence
from sagellm.runtime.step_inputs import ALIGN, BlockRows, HostBuffers, StepLayout, stage

BS = 4


def reference(batch: ScheduledBatch, bs: int) -> dict:
    """What the model runner packed before the reusable buffers (kept here as the oracle)."""
    ids, pos, slots, lens, qsl, rows, samplers = [], [], [], [], [0], [], []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        ids += seq.token_ids[start:end]
        pos += range(start, end)
        slots += [seq.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
        lens.append(end)
        qsl.append(qsl[-1] + n)
        if end == seq.num_tokens:
            rows.append(qsl[-1] - 1)
            samplers.append(seq)
    width = max(len(s.block_ids) for s in batch.seqs)
    tables = np.zeros((len(batch.seqs), width), dtype=np.int32)
    for i, seq in enumerate(batch.seqs):
        tables[i, : len(seq.block_ids)] = seq.block_ids
    return dict(
        ids=ids,
        pos=pos,
        slots=slots,
        lens=lens,
        qsl=qsl,
        rows=rows,
        tables=tables,
        samplers=samplers,
    )


def unpack(buf: HostBuffers, step) -> dict:
    lay, t, s = step.layout, step.layout.tokens, step.layout.rows
    a, b = buf.np64, buf.np32
    return dict(
        ids=a[:t].tolist(),
        pos=a[lay.positions : lay.positions + t].tolist(),
        slots=a[lay.slots : lay.slots + t].tolist(),
        rows=a[lay.logit_rows : lay.logit_rows + lay.num_logits].tolist(),
        lens=b[:s].tolist(),
        qsl=b[lay.query_start_loc : lay.query_start_loc + s + 1].tolist(),
        tables=buf.tables(lay).copy(),
    )


def make_seq(rng: random.Random, prompt_len: int, computed: int, new: int, pool: list[int]):
    seq = Sequence("r", 0, [rng.randrange(1000) for _ in range(prompt_len)], SamplingParams())
    seq.num_computed_tokens = computed
    need = -(-(computed + new) // BS)
    seq.block_ids = [pool.pop() for _ in range(need)]
    return seq, new


def random_batch(rng: random.Random, num: int, decode: bool) -> ScheduledBatch:
    pool = list(range(10_000))
    rng.shuffle(pool)
    batch = ScheduledBatch()
    for _ in range(num):
        plen = rng.randint(1, 40)
        if decode:
            seq, n = make_seq(rng, plen, plen - 1, 1, pool)
        else:  # a chunk somewhere in the prompt, possibly after a prefix hit, possibly its end
            computed = rng.randrange(plen)
            seq, n = make_seq(rng, plen, computed, rng.randint(1, plen - computed), pool)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
    return batch


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decode", [False, True])
def test_stage_matches_the_list_reference(seed, decode):
    rng = random.Random(seed)
    batch = random_batch(rng, rng.randint(1, 9), decode)
    buf, block_rows = HostBuffers(pin=False), BlockRows()
    step = stage(batch, buf, block_rows, BS)
    ref = reference(batch, BS)
    got = unpack(buf, step)
    for key in ("ids", "pos", "slots", "rows", "lens", "qsl"):
        assert got[key] == ref[key], key
    np.testing.assert_array_equal(got["tables"], ref["tables"])
    assert step.decode_only == all(n == 1 for n in batch.num_new_tokens)
    assert step.samplers == ref["samplers"]
    assert step.logits_are_prefix == (decode and len(ref["rows"]) == len(batch.seqs))


def test_segments_are_aligned():
    lay = StepLayout(tokens=5, rows=3, width=7, num_logits=2)
    for offset in (lay.positions, lay.slots, lay.logit_rows, lay.query_start_loc, lay.block_tables):
        assert offset % ALIGN == 0
    assert lay.i32_size == lay.block_tables + 3 * 7


def test_padding_rows_are_harmless():
    rng = random.Random(3)
    batch = random_batch(rng, 3, decode=True)
    buf = HostBuffers(pin=False)
    step = stage(batch, buf, BlockRows(), BS, pad_to=8)
    got, ref = unpack(buf, step), reference(batch, BS)
    assert step.layout.tokens == step.layout.rows == 8 and step.num_seqs == 3
    assert got["ids"] == ref["ids"] + [0] * 5
    assert got["pos"] == ref["pos"] + [0] * 5
    assert got["slots"] == ref["slots"] + [-1] * 5  # no cache write
    assert got["lens"] == ref["lens"] + [1] * 5  # one key: slot 0 of block 0
    assert got["qsl"] == list(range(9))
    assert (got["tables"][3:] == 0).all()
    np.testing.assert_array_equal(got["tables"][:3], ref["tables"])
    assert got["rows"] == [0, 1, 2] and step.logits_are_prefix


def test_padding_needs_a_decode_batch_that_fits():
    rng = random.Random(4)
    with pytest.raises(ValueError, match="pad_to = 2"):
        stage(random_batch(rng, 3, decode=True), HostBuffers(pin=False), BlockRows(), BS, 2)
    prefill = random_batch(rng, 2, decode=False)
    prefill.num_new_tokens[0] = 2
    prefill.seqs[0].num_computed_tokens = 0
    with pytest.raises(ValueError, match="decode-only"):
        stage(prefill, HostBuffers(pin=False), BlockRows(), BS, 8)


def test_buffers_grow_and_old_contents_do_not_leak():
    rng = random.Random(5)
    buf, block_rows = HostBuffers(pin=False), BlockRows()
    small = buf.i64.numel()
    big = random_batch(rng, 40, decode=False)
    step = stage(big, buf, block_rows, BS)
    assert buf.i64.numel() > small
    assert unpack(buf, step)["ids"] == reference(big, BS)["ids"]
    # A narrower step after a wide one: its table has zeros, not the wide step's ids.
    narrow = random_batch(rng, 2, decode=True)
    step = stage(narrow, buf, block_rows, BS)
    np.testing.assert_array_equal(unpack(buf, step)["tables"], reference(narrow, BS)["tables"])


def test_block_rows_follow_growth_and_replacement():
    seq = Sequence("r", 0, list(range(10)), SamplingParams())
    rows = BlockRows()
    seq.block_ids = [5, 9]
    assert rows.get(seq)[:2].tolist() == [5, 9]
    seq.block_ids += list(range(100, 140))  # grows in place, past the row's capacity
    assert rows.get(seq)[:42].tolist() == [5, 9, *range(100, 140)]
    seq.block_ids = [7]  # freed and readmitted: a new list
    assert rows.get(seq)[:1].tolist() == [7]
    seq.block_ids = []
    seq.block_ids = [3, 4]  # same length as never seen, new list again
    assert rows.get(seq)[:2].tolist() == [3, 4]


def test_pinned_buffers_only_on_cuda():
    assert not HostBuffers(pin=False).i64.is_pinned()
    if torch.cuda.is_available():
        assert HostBuffers(pin=True).i64.is_pinned()
