"""The native block allocator against a plain Python model of the same rules."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagellm._C import BlockAllocator, NoFreeBlocksError


class ModelAllocator:
    """The allocator's contract, written as simply as possible (O(n) everywhere)."""

    def __init__(self, n: int):
        self.n = n
        self.ref = [0] * n
        self.hash: dict[int, int] = {}  # block -> content hash
        self.lru: list[int] = []  # cached blocks, least recently freed first
        self.free = list(range(n))  # unhashed free blocks
        self.hits = self.misses = self.evictions = 0

    def allocate(self) -> int | None:
        if self.free:
            b = min(self.free)  # which free block is returned is not part of the contract
            return b
        if self.lru:
            return self.lru[0]
        return None

    def take(self, b: int) -> None:
        if b in self.free:
            self.free.remove(b)
        else:
            assert self.lru[0] == b, "evicted block must be the least recently freed one"
            self.lru.pop(0)
            del self.hash[b]
            self.evictions += 1
        self.ref[b] = 1

    def by_hash(self, h: int) -> int:
        for b, bh in self.hash.items():
            if bh == h:
                return b
        return -1


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.n = 12
        self.real = BlockAllocator(self.n)
        self.model = ModelAllocator(self.n)
        self.held: list[int] = []  # one entry per reference we hold

    @rule()
    def allocate(self):
        expected = self.model.allocate()
        if expected is None:
            with pytest.raises(NoFreeBlocksError):
                self.real.allocate()
            return
        b = self.real.allocate()
        assert self.model.ref[b] == 0, f"block {b} handed out while in use"
        if expected in self.model.lru or b in self.model.lru:
            # No free block: the LRU cached block must be the one evicted.
            assert b == expected
        else:
            assert b in self.model.free
        self.model.take(b)
        self.held.append(b)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        b = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.real.free(b)
        self.model.ref[b] -= 1
        if self.model.ref[b] == 0:
            if b in self.model.hash:
                self.model.lru.append(b)
            else:
                self.model.free.append(b)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def share(self, data):
        b = data.draw(st.sampled_from(self.held))
        self.real.incref(b)
        self.model.ref[b] += 1
        self.held.append(b)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), h=st.integers(0, 6))
    def set_hash(self, data, h):
        b = data.draw(st.sampled_from(self.held))
        owner = self.model.by_hash(h)
        if b in self.model.hash:
            if self.model.hash[b] == h:
                assert self.real.set_hash(b, h)
            else:
                with pytest.raises(ValueError, match="already holds other content"):
                    self.real.set_hash(b, h)
            return
        ok = self.real.set_hash(b, h)
        assert ok == (owner == -1)
        if ok:
            self.model.hash[b] = h

    @rule(h=st.integers(0, 6))
    def lookup(self, h):
        owner = self.model.by_hash(h)
        got = self.real.lookup(h)
        assert got == owner
        if owner == -1:
            self.model.misses += 1
            return
        self.model.hits += 1
        if self.model.ref[owner] == 0:
            self.model.lru.remove(owner)
        self.model.ref[owner] += 1
        self.held.append(owner)

    @rule(h=st.integers(0, 6))
    def peek(self, h):
        assert self.real.peek(h) == self.model.by_hash(h)

    @invariant()
    def counters_agree(self):
        m = self.model
        assert self.real.num_free == len(m.free) + len(m.lru)
        assert self.real.num_cached == len(m.lru)
        assert self.real.num_used == sum(1 for r in m.ref if r > 0)
        assert (self.real.hits, self.real.misses, self.real.evictions) == (
            m.hits,
            m.misses,
            m.evictions,
        )
        for b in range(self.n):
            assert self.real.ref_count(b) == m.ref[b]
            assert self.real.is_hashed(b) == (b in m.hash)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_errors_are_python_exceptions_with_clear_messages():
    a = BlockAllocator(4)
    with pytest.raises(IndexError, match=r"block 9 is out of range \[0, 4\)"):
        a.free(9)
    with pytest.raises(IndexError, match="out of range"):
        a.free(-1)
    with pytest.raises(ValueError, match="double free: block 0"):
        a.free(0)
    b = a.allocate()
    a.free(b)
    with pytest.raises(ValueError, match="double free"):
        a.free(b)
    with pytest.raises(ValueError, match="not in use"):
        a.incref(b)
    a.allocate_n(4)
    with pytest.raises(NoFreeBlocksError, match="all 4 blocks are in use"):
        a.allocate()
    assert issubclass(NoFreeBlocksError, RuntimeError)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


def test_allocate_n_is_all_or_nothing():
    a = BlockAllocator(5)
    a.allocate_n(3)
    with pytest.raises(NoFreeBlocksError, match="only 2 of 5"):
        a.allocate_n(3)
    assert a.num_free == 2


def test_prefix_reuse_and_lru_eviction_order():
    a = BlockAllocator(3)
    h0 = BlockAllocator.hash_block(0, [1, 2, 3, 4])
    h1 = BlockAllocator.hash_block(h0, [5, 6, 7, 8])
    b0, b1 = a.allocate(), a.allocate()
    assert a.set_hash(b0, h0) and a.set_hash(b1, h1)
    a.free(b1)
    a.free(b0)  # b1 freed first, so it is the least recently used
    assert a.num_cached == 2 and a.num_free == 3
    assert a.lookup(h0) == b0  # revived: no longer evictable
    assert a.num_cached == 1
    fresh = a.allocate()  # the one never-used block
    assert fresh not in (b0, b1)
    evicted = a.allocate()  # only b1 is left, cached: evict it
    assert evicted == b1 and a.evictions == 1
    assert a.lookup(h1) == -1 and a.misses == 1 and a.hits == 1


def test_hash_chain_depends_on_parent_length_and_order():
    h = BlockAllocator.hash_block
    assert h(0, [1, 2]) == h(0, [1, 2])
    assert h(0, [1, 2]) != h(0, [2, 1])
    assert h(0, [1, 2]) != h(1, [1, 2])
    assert h(0, [1]) != h(0, [1, 0])
    assert 0 <= h(2**64 - 1, [2**40, -1]) < 2**64


def test_clear_cache_returns_cached_blocks_to_free():
    a = BlockAllocator(2)
    b = a.allocate()
    a.set_hash(b, 42)
    a.free(b)
    assert a.num_cached == 1
    a.clear_cache()
    assert a.num_cached == 0 and a.peek(42) == -1 and a.num_free == 2
