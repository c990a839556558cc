"""Continuous batching at iteration level under a per-step token budget.

Each step: running sequences first (decodes and unfinished prefill chunks, oldest first), then
waiting ones (by priority, then arrival) while budget, sequence slots and blocks last. A prompt
longer than the remaining budget is split over several steps (chunked prefill), so long prompts
never stall the decodes sharing the step. When a running sequence needs a block and none is free,
the most recently admitted sequence is preempted: its blocks are freed and it waits to be
recomputed (its full blocks usually come straight back from the prefix cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sagellm.runtime.block_manager import BlockManager
from sagellm.runtime.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.times.evict_count += 1
        seq.times.preempted_at = time.monotonic()
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

    def _victim(self) -> Sequence:
        # Lowest priority (largest value) first, then the most recently admitted.
        return max(reversed(self.running), key=lambda s: s.priority)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.try_grow(seq, num_new):
                victim = self._victim()
                if victim in out.seqs:  # already in this step's batch: take it back out
                    i = out.seqs.index(victim)
                    out.seqs.pop(i)
                    budget += out.num_new_tokens.pop(i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.seqs.append(seq)
                out.num_new_tokens.append(num_new)
                budget -= num_new

        if out.preempted:
            return out  # memory is tight: admit nothing new this step
        self.waiting.sort(key=lambda s: (s.priority, s.times.arrival))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = self.blocks.try_admit(seq, budget)
            if num_new == 0:
                break
            self.waiting.pop(0)
            now = time.monotonic()
            if seq.times.first_scheduled is None:
                seq.times.first_scheduled = now
            if seq.times.preempted_at is not None:
                seq.times.evict_s += now - seq.times.preempted_at
                seq.times.preempted_at = None
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            budget -= num_new
        return out
