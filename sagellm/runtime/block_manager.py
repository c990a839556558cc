"""KV block bookkeeping per sequence, over the native allocator (sagellm.kv_cache).

Each full block of computed tokens is hashed by content (parent hash + its token ids), so a later
sequence whose tokens start the same way takes those blocks instead of recomputing them: shared
system prompts, multi-turn chats and n > 1 choices all hit. A partly filled block is never shared,
so a sequence only ever writes into blocks it owns alone.
"""

from __future__ import annotations

from sagellm.kv_cache import BlockAllocator
from sagellm.runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        # Admission keeps ~1 % of blocks free so running sequences can grow without preemption.
        self.watermark = max(1, num_blocks // 100)
        self.prompt_tokens = 0  # prompt tokens admitted, and how many the prefix cache served
        self.prompt_tokens_hit = 0

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------------
    def _full_block_hashes(self, seq: Sequence, limit_blocks: int) -> list[int]:
        bs, out, parent = self.block_size, [], 0
        toks = seq.token_ids
        for j in range(limit_blocks):
            parent = BlockAllocator.hash_block(parent, toks[j * bs : (j + 1) * bs])
            out.append(parent)
        return out

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(hashes, blocks) of the longest cached prefix, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return [], []
        limit = (seq.num_tokens - 1) // self.block_size
        hashes, blocks = [], []
        for h in self._full_block_hashes(seq, limit):
            b = self.allocator.peek(h)
            if b < 0:
                break
            hashes.append(h)
            blocks.append(b)
        return hashes, blocks

    # -- admission and growth ----------------------------------------------------------------
    def try_admit(self, seq: Sequence, max_new_tokens: int) -> int:
        """Give a waiting sequence its cached prefix and blocks for up to max_new_tokens more.

        Returns how many tokens it may compute this step (0: not enough free blocks; nothing
        changed). The sequence's num_computed_tokens is set past its cached prefix.
        """
        assert not seq.block_ids, "admitting a sequence that still holds blocks"
        hashes, hits = self._prefix_hits(seq)
        cached_tokens = len(hits) * self.block_size
        num_new = min(seq.num_tokens - cached_tokens, max_new_tokens)
        if num_new <= 0:
            return 0
        revived = sum(1 for b in hits if self.allocator.ref_count(b) == 0)
        fresh = self.blocks_for(cached_tokens + num_new) - len(hits)
        if fresh + revived > self.allocator.num_free - self.watermark:
            return 0
        for h, b in zip(hashes, hits):
            got = self.allocator.lookup(h)
            assert got == b
        seq.block_ids = list(hits) + self.allocator.allocate_n(fresh)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = cached_tokens
        if seq.times.evict_count == 0:  # first admission: a recompute is not a prefix hit
            seq.num_cached_prompt_tokens = cached_tokens
            self.prompt_tokens += seq.num_prompt_tokens
            self.prompt_tokens_hit += cached_tokens
        seq.peak_blocks = max(seq.peak_blocks, len(seq.block_ids))
        return num_new

    def try_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make sure the blocks of a running sequence cover num_new_tokens more tokens."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.block_ids += self.allocator.allocate_n(need)
        seq.peak_blocks = max(seq.peak_blocks, len(seq.block_ids))
        return True

    def commit(self, seq: Sequence) -> None:
        """After a step: hash the blocks that became full so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else 0
        for j in range(len(seq.block_hashes), full):
            parent = BlockAllocator.hash_block(parent, seq.token_ids[j * bs : (j + 1) * bs])
            # False when an identical block was cached meanwhile: ours then stays private.
            self.allocator.set_hash(seq.block_ids[j], parent)
            seq.block_hashes.append(parent)

    def free(self, seq: Sequence) -> None:
        # Release in reverse so the tail of a sequence is evicted before its shared prefix.
        for b in reversed(seq.block_ids):
            self.allocator.free(b)
        seq.block_ids = []
        seq.block_hashes = []

    def prefix_hit_rate(self) -> float:
        return self.prompt_tokens_hit / self.prompt_tokens if self.prompt_tokens else 0.0

    def usage(self) -> float:
        return self.allocator.num_used / self.allocator.num_blocks
