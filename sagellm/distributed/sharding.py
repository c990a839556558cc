"""How a tensor-parallel group splits a model: contiguous ranges per rank.

Every split is a contiguous range, so a rank narrows each checkpoint tensor to one slice (rows
for column-parallel layers, columns for row-parallel ones) before copying anything.

Attention heads are split by KV group, not by query head: the paged attention kernels map query
head h to KV head h // (num_heads / num_kv_heads), a uniform ratio. A split by query count
(SmolLM2's 9 heads over 2 ranks as 5 + 4) gives rank 0 query heads {0, 1, 2} on KV head 0 and
{3, 4} on KV head 1, which no uniform ratio describes; whole KV groups per rank (6 + 3 there)
keep the ratio and stay exact. With fewer KV heads than ranks, each KV head is replicated on
tp / num_kv_heads ranks and its query heads are split between them.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of part `index` when n items are cut into `parts` contiguous pieces as
    evenly as possible (the first n % parts pieces are one larger)."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part index = {index} is out of range [0, {parts})")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, base + (1 if index < extra else 0)


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads one rank holds: query heads [q_start, q_start + num_heads) and KV
    heads [kv_start, kv_start + num_kv_heads), in the checkpoint's numbering."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def split_heads(num_heads: int, num_kv_heads: int, tp_size: int, rank: int) -> HeadSplit:
    """The heads of `rank` (see the module docstring). Raises ValueError when the heads cannot
    be split without breaking the kernels' uniform query-to-KV ratio."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads = {num_heads} is not a multiple of num_kv_heads = {num_kv_heads}"
        )
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        kv_start, kv_count = split_range(num_kv_heads, tp_size, rank)
        if kv_count == 0:  # unreachable (num_kv_heads >= tp_size), kept as a guard
            raise ValueError(f"rank {rank} of {tp_size} would hold no KV head")
        return HeadSplit(kv_start * group, kv_count * group, kv_start, kv_count)
    if tp_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size = {tp_size} is not a multiple of num_kv_heads = {num_kv_heads}: "
            "each KV head must be replicated on the same number of ranks"
        )
    replicas = tp_size // num_kv_heads
    if group < replicas:
        raise ValueError(
            f"tensor_parallel_size = {tp_size} exceeds num_heads = {num_heads}: some rank would "
            "hold no query head"
        )
    kv = rank // replicas
    start, count = split_range(group, replicas, rank % replicas)
    return HeadSplit(kv * group + start, count, kv, 1)
