"""How heads, vocabulary and MLP columns are split between tensor-parallel ranks."""

from __future__ import annotations

import pytest

from sagellm.distributed.sharding import HeadSplit, split_heads, split_range


def test_split_range_covers_everything_once():
    for n in (1, 7, 9, 49152):
        for parts in (1, 2, 3, 4):
            ranges = [split_range(n, parts, i) for i in range(parts)]
            assert ranges[0][0] == 0
            for (s0, n0), (s1, _) in zip(ranges, ranges[1:]):
                assert s0 + n0 == s1
            assert sum(size for _, size in ranges) == n
            assert max(s for _, s in ranges) - min(s for _, s in ranges) <= 1


def test_split_range_rejects_bad_index():
    with pytest.raises(ValueError, match="part index = 2 is out of range"):
        split_range(8, 2, 2)


def _kv_of(split: HeadSplit, q: int, group: int) -> int:
    """The KV head the kernels pair with global q head q on this rank (uniform local ratio)."""
    local_ratio = split.num_heads // split.num_kv_heads
    return split.kv_start + (q - split.q_start) // local_ratio


@pytest.mark.parametrize(
    "heads,kv,tp",
    [(9, 3, 2), (32, 8, 2), (32, 8, 4), (8, 2, 4), (2, 1, 2), (4, 1, 4), (12, 12, 2), (6, 2, 2)],
)
def test_every_q_head_once_with_its_own_kv_head(heads, kv, tp):
    group = heads // kv
    seen = []
    for r in range(tp):
        s = split_heads(heads, kv, tp, r)
        assert s.num_heads % s.num_kv_heads == 0, "the kernels need a uniform q/kv ratio"
        for q in range(s.q_start, s.q_start + s.num_heads):
            assert _kv_of(s, q, group) == q // group, f"rank {r}: q head {q} reads the wrong KV"
            seen.append(q)
    assert seen == list(range(heads))


def test_smollm2_heads_split_by_kv_group():
    # 9 q heads in 3 KV groups of 3 over 2 ranks: whole groups, so 6 + 3.
    assert split_heads(9, 3, 2, 0) == HeadSplit(0, 6, 0, 2)
    assert split_heads(9, 3, 2, 1) == HeadSplit(6, 3, 2, 1)


def test_kv_heads_replicated_when_fewer_than_ranks():
    assert split_heads(2, 1, 2, 0) == HeadSplit(0, 1, 0, 1)
    assert split_heads(2, 1, 2, 1) == HeadSplit(1, 1, 0, 1)


def test_impossible_splits_raise():
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads = 2"):
        split_heads(8, 2, 3, 0)
    with pytest.raises(ValueError, match="exceeds num_heads = 2"):
        split_heads(2, 1, 4, 0)
