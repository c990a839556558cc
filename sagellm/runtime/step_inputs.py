"""One step's inputs, packed on the host into reusable buffers.

A step is two flat host buffers, each filled with one numpy write per field:
    int64: input_ids [tokens] | positions [tokens] | slot_mapping [tokens] | logit_rows [sampled]
    int32: seq_lens [rows] | query_start_loc [rows + 1] | block_tables [rows, width]
so moving a step to the GPU is two asynchronous copies (the buffers are pinned on CUDA). Every
segment starts on a 64-element boundary, so device views of the copies stay aligned for vector
loads. `tokens` and `rows` exceed the batch when a decode step is padded to a CUDA-graph bucket:
padding rows hold token 0 at position 0, slot -1 (no cache write) and seq_len 1 over block 0 (its
first slot is read and the result dropped), so they never touch a live sequence.

Block tables are the costly field (a 256-sequence batch at 1k tokens is 16k block ids): each
sequence's ids are kept as a numpy row that only appends its new blocks, so a step copies rows
instead of converting Python lists.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from sagellm.runtime.scheduler import ScheduledBatch
from sagellm.runtime.sequence import Sequence

ALIGN = 64  # elements


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class StepLayout:
    """Where each field of a step sits in the two flat buffers (offsets in elements)."""

    tokens: int  # token rows (the batch's tokens, or the padded bucket)
    rows: int  # sequence rows
    width: int  # block-table columns
    num_logits: int  # rows whose logits are sampled

    @property
    def positions(self) -> int:
        return aligned(self.tokens)

    @property
    def slots(self) -> int:
        return 2 * aligned(self.tokens)

    @property
    def logit_rows(self) -> int:
        return 3 * aligned(self.tokens)

    @property
    def i64_size(self) -> int:
        return self.logit_rows + self.num_logits

    @property
    def query_start_loc(self) -> int:
        return aligned(self.rows)

    @property
    def block_tables(self) -> int:
        return aligned(self.rows) + aligned(self.rows + 1)

    @property
    def i32_size(self) -> int:
        return self.block_tables + self.rows * self.width


@dataclass
class StagedStep:
    """A step written into host buffers: its layout and what the runner does after the forward."""

    layout: StepLayout
    num_seqs: int
    num_tokens: int
    decode_only: bool
    samplers: list[Sequence]  # sequences that sample a token this step, in row order
    logits_are_prefix: bool  # the sampled rows are exactly rows 0..len(samplers)-1


class HostBuffers:
    """Two flat host buffers that grow when a step needs more; pinned on CUDA."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.i64 = self._alloc(0, torch.int64)
        self.i32 = self._alloc(0, torch.int32)
        self.np64, self.np32 = self.i64.numpy(), self.i32.numpy()

    def _alloc(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(max(n, 4 * ALIGN), dtype=dtype, pin_memory=self.pin)

    def reserve(self, layout: StepLayout) -> None:
        # Grown by half again as much so that slowly rising demand reallocates rarely.
        if layout.i64_size > self.i64.numel():
            self.i64 = self._alloc(layout.i64_size * 3 // 2, torch.int64)
            self.np64 = self.i64.numpy()
        if layout.i32_size > self.i32.numel():
            self.i32 = self._alloc(layout.i32_size * 3 // 2, torch.int32)
            self.np32 = self.i32.numpy()

    def tables(self, layout: StepLayout) -> np.ndarray:
        start = layout.block_tables
        return self.np32[start : start + layout.rows * layout.width].reshape(
            layout.rows, layout.width
        )


class BlockRows:
    """Each live sequence's block ids as a numpy int32 row, extended as its blocks grow.

    Relies on how the block manager changes a sequence's `block_ids`: growth appends to the same
    list; admission and freeing assign a new list. A new list object rebuilds the row.
    """

    def __init__(self) -> None:
        self._rows: weakref.WeakKeyDictionary[Sequence, _Row] = weakref.WeakKeyDictionary()

    def get(self, seq: Sequence) -> np.ndarray:
        blocks = seq.block_ids
        row = self._rows.get(seq)
        n = len(blocks)
        if row is None or row.ids is not blocks or row.filled > n:
            row = _Row(blocks, np.empty(max(16, 2 * n), dtype=np.int32), 0)
            self._rows[seq] = row
        if row.filled < n:
            if row.array.shape[0] < n:
                grown = np.empty(2 * n, dtype=np.int32)
                grown[: row.filled] = row.array[: row.filled]
                row.array = grown
            row.array[row.filled : n] = blocks[row.filled :]
            row.filled = n
        return row.array


@dataclass
class _Row:
    ids: list[int]  # the sequence's block list this row mirrors (kept alive: identity check)
    array: np.ndarray
    filled: int


def _extend_slots(slots: list[int], blocks: list[int], start: int, end: int, bs: int) -> None:
    """Cache slots of positions start..end-1: one range per block instead of one op per token."""
    p = start
    while p < end:
        j = p // bs
        stop = min(end, (j + 1) * bs)
        base = blocks[j] * bs - j * bs
        slots.extend(range(base + p, base + stop))
        p = stop


def stage(
    batch: ScheduledBatch,
    buffers: HostBuffers,
    block_rows: BlockRows,
    block_size: int,
    pad_to: int | None = None,
) -> StagedStep:
    """Pack `batch` into `buffers`. pad_to: pad a decode-only batch to that many rows."""
    bs = block_size
    seqs, counts = batch.seqs, batch.num_new_tokens
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    qsl = [0]
    logit_rows: list[int] = []
    samplers: list[Sequence] = []
    rows: list[tuple[np.ndarray, int]] = []
    width = 1
    t = 0
    for seq, n in zip(seqs, counts):
        start = seq.num_computed_tokens
        end = start + n
        blocks = seq.block_ids
        if n == 1:
            ids.append(seq.token_ids[start])
            positions.append(start)
            slots.append(blocks[start // bs] * bs + start % bs)
        else:
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            _extend_slots(slots, blocks, start, end, bs)
        t += n
        seq_lens.append(end)
        qsl.append(t)
        if end == seq.num_tokens:  # the step reaches the sequence's last token: sample
            logit_rows.append(t - 1)
            samplers.append(seq)
        nb = len(blocks)
        width = max(width, nb)
        rows.append((block_rows.get(seq), nb))

    num_seqs = len(seqs)
    decode_only = all(n == 1 for n in counts)
    if pad_to is not None and (not decode_only or pad_to < num_seqs):
        raise ValueError(
            f"pad_to = {pad_to} needs a decode-only batch of at most that many sequences "
            f"(got {num_seqs} sequences, {t} tokens)"
        )
    total = pad_to or num_seqs
    tokens = pad_to or t
    layout = StepLayout(tokens, total, width, len(logit_rows))
    buffers.reserve(layout)
    a, b = buffers.np64, buffers.np32
    a[:t] = ids
    a[layout.positions : layout.positions + t] = positions
    a[layout.slots : layout.slots + t] = slots
    a[layout.logit_rows : layout.logit_rows + len(logit_rows)] = logit_rows
    b[:num_seqs] = seq_lens
    b[layout.query_start_loc : layout.query_start_loc + num_seqs + 1] = qsl
    if tokens > t:  # padding rows: harmless (see the module docstring)
        a[t:tokens] = 0
        a[layout.positions + t : layout.positions + tokens] = 0
        a[layout.slots + t : layout.slots + tokens] = -1
        b[num_seqs:total] = 1
        q = layout.query_start_loc
        b[q + num_seqs + 1 : q + total + 1] = np.arange(t + 1, tokens + 1, dtype=np.int32)
    tables = buffers.tables(layout)
    tables.fill(0)
    for i, (row, nb) in enumerate(rows):
        tables[i, :nb] = row[:nb]
    prefix = decode_only and len(logit_rows) == num_seqs  # every row samples, in order
    return StagedStep(layout, num_seqs, t, decode_only, samplers, prefix)
