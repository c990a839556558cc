"""BlockManager on the real native allocator with real Sequence objects (no model): admission,
growth, prefix-cache hits and their accounting, release, and all-or-nothing failure."""

from __future__ import annotations

import pytest

from sagellm.runtime.block_manager import BlockManager
from sagellm.runtime.params import SamplingParams
from sagellm.runtime.sequence import Sequence

BS = 4


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, 0, tokens, SamplingParams())


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit and compute the whole prompt in one go, as the engine would, then commit."""
    n = bm.try_admit(seq, 10_000)
    assert n == seq.num_tokens - seq.num_computed_tokens
    seq.num_computed_tokens += n
    bm.commit(seq)


def snapshot(bm: BlockManager, seq: Sequence) -> dict:
    a = bm.allocator
    return dict(
        free=a.num_free,
        used=a.num_used,
        cached=a.num_cached,
        hits=a.hits,
        misses=a.misses,
        refs=[a.ref_count(b) for b in range(a.num_blocks)],
        prompt_tokens=bm.prompt_tokens,
        prompt_tokens_hit=bm.prompt_tokens_hit,
        seq=(
            list(seq.block_ids),
            list(seq.block_hashes),
            seq.num_computed_tokens,
            seq.num_cached_prompt_tokens,
            seq.peak_blocks,
        ),
    )


def test_admit_allocates_blocks_for_the_chunk_only():
    bm = BlockManager(32, BS)
    seq = make_seq("a", list(range(10)))
    assert bm.try_admit(seq, 6) == 6
    assert len(seq.block_ids) == 2  # ceil(6 / 4)
    assert seq.num_computed_tokens == 0 and bm.num_used_blocks == 2
    seq.num_computed_tokens = 6
    assert bm.try_grow(seq, 4)
    assert len(seq.block_ids) == 3 and bm.num_used_blocks == 3
    assert bm.try_grow(seq, 2)  # 12 tokens still fit in 3 blocks
    assert len(seq.block_ids) == 3
    assert len(set(seq.block_ids)) == 3


def test_commit_hashes_only_full_computed_blocks():
    bm = BlockManager(32, BS)
    seq = make_seq("a", list(range(10)))
    prefill(bm, seq)
    assert len(seq.block_hashes) == 2  # tokens 0..7; the third block holds only 2
    assert all(bm.allocator.is_hashed(b) for b in seq.block_ids[:2])
    assert not bm.allocator.is_hashed(seq.block_ids[2])


def test_prefix_hits_share_blocks_and_are_counted():
    bm = BlockManager(32, BS)
    a = make_seq("a", list(range(12)))
    prefill(bm, a)
    b = make_seq("b", list(range(8)) + [100, 101])
    n = bm.try_admit(b, 10_000)
    assert b.num_computed_tokens == 8 and n == 2
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] not in a.block_ids
    assert [bm.allocator.ref_count(x) for x in a.block_ids[:2]] == [2, 2]
    assert b.num_cached_prompt_tokens == 8
    assert bm.prompt_tokens == 22 and bm.prompt_tokens_hit == 8
    assert bm.prefix_hit_rate() == pytest.approx(8 / 22)
    bm.free(a)
    bm.free(b)
    assert bm.num_used_blocks == 0


def test_no_hits_when_prefix_caching_is_off():
    bm = BlockManager(32, BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(12)))
    prefill(bm, a)
    assert a.block_hashes == []
    b = make_seq("b", list(range(12)))
    bm.try_admit(b, 10_000)
    assert b.num_computed_tokens == 0 and not set(a.block_ids) & set(b.block_ids)
    assert bm.prefix_hit_rate() == 0.0


def test_freed_blocks_stay_cached_and_are_revived():
    bm = BlockManager(32, BS)
    a = make_seq("a", list(range(9)))
    prefill(bm, a)
    first_two = a.block_ids[:2]
    bm.free(a)
    assert bm.num_used_blocks == 0 and a.block_ids == [] and a.block_hashes == []
    assert bm.allocator.num_cached == 2
    b = make_seq("b", list(range(9)))
    assert bm.try_admit(b, 10_000) == 1
    assert b.block_ids[:2] == first_two
    assert bm.num_used_blocks == 3 and bm.allocator.num_cached == 0


def test_fully_cached_prompt_still_computes_a_token():
    """The last prompt token must run through the model to produce logits, even when every block
    of the prompt is in the cache."""
    bm = BlockManager(32, BS)
    a = make_seq("a", list(range(8)))
    prefill(bm, a)
    b = make_seq("b", list(range(8)))
    n = bm.try_admit(b, 10_000)
    assert n >= 1
    assert b.num_computed_tokens + n == 8
    assert b.num_computed_tokens == 4  # block granularity: the last full block is recomputed
    bm.free(a)
    bm.free(b)
    assert bm.num_used_blocks == 0


def test_failed_admission_changes_nothing():
    bm = BlockManager(8, BS)  # watermark 1
    cached = make_seq("c", list(range(8)))
    prefill(bm, cached)
    bm.free(cached)  # two cached blocks a later prompt could hit
    hogs = [make_seq(f"h{i}", [1000 + 10 * i + j for j in range(8)]) for i in range(2)]
    for h in hogs:
        prefill(bm, h)
    assert bm.num_free_blocks == 4  # 2 free + 2 cached
    seq = make_seq("s", list(range(8)) + list(range(500, 516)))  # 2 hits + 4 fresh blocks
    before = snapshot(bm, seq)
    assert bm.try_admit(seq, 10_000) == 0
    assert snapshot(bm, seq) == before
    # With room for just the chunk it goes through, taking the hits.
    assert bm.try_admit(seq, 4) == 4
    assert seq.num_computed_tokens == 8 and len(seq.block_ids) == 3
    for s in (*hogs, seq):
        bm.free(s)
    assert bm.num_used_blocks == 0


def test_try_grow_fails_cleanly_when_full():
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(8)))
    prefill(bm, a)
    b = make_seq("b", list(range(100, 104)))
    prefill(bm, b)
    b.token_ids += [104, 105, 106, 107]
    assert bm.try_grow(b, 4)  # the last block: growth ignores the admission watermark
    assert bm.num_free_blocks == 0
    a.token_ids.append(9)
    blocks = list(a.block_ids)
    assert not bm.try_grow(a, 1)
    assert a.block_ids == blocks and bm.num_used_blocks == 4
    bm.free(b)
    assert bm.try_grow(a, 1) and len(a.block_ids) == 3
    bm.free(a)
    assert bm.num_used_blocks == 0
