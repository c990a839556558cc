"""Turns a scheduled batch into one packed forward pass, then samples.

Owns the model, its paged KV cache (one [2, num_blocks, block_size, kv_heads, head_size] tensor
per layer) and the sampler. Inputs are packed without padding: the step's new tokens of every
sequence one after another, with the per-step metadata every layer shares.
"""

from __future__ import annotations

import torch

from sagellm.models.base import CausalLM
from sagellm.models.layers.attention import AttentionMetadata
from sagellm.runtime.sampler import Sampler, SamplerOutput, SamplingBatch
from sagellm.runtime.scheduler import ScheduledBatch
from sagellm.runtime.sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ):
        self.model, self.device, self.block_size = model, device, block_size
        self.kv_dtype = kv_dtype or model.dtype
        shape = model.kv_cache_shape(num_blocks, block_size)
        # Never read before written: the kernels only look at slots below each seq_len.
        self.kv_caches = [
            torch.empty(shape, dtype=self.kv_dtype, device=device) for _ in range(model.num_layers)
        ]
        self.sampler = Sampler()

    def kv_cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.kv_caches)

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[Sequence]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        qsl = [0]
        logit_rows: list[int] = []
        samplers: list[Sequence] = []
        max_blocks = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            blocks = seq.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            qsl.append(qsl[-1] + n)
            max_blocks = max(max_blocks, len(blocks))
            if end == seq.num_tokens:  # the step reaches the sequence's last token: sample
                logit_rows.append(qsl[-1] - 1)
                samplers.append(seq)
        tables = torch.zeros(len(batch.seqs), max_blocks, dtype=torch.int32)
        for i, seq in enumerate(batch.seqs):
            tables[i, : len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
            decode_only=all(n == 1 for n in batch.num_new_tokens),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos, meta, logit_rows, samplers

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        ids, pos, meta, rows, samplers = self.prepare(batch)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if not samplers:
            return [], None
        logits = self.model.compute_logits(hidden[rows])
        # Token histories only matter to penalties: don't copy them for the other rows.
        pen = [s.params.uses_penalties for s in samplers]
        sb = SamplingBatch.build(
            [s.params for s in samplers],
            [s.output_token_ids if p else () for s, p in zip(samplers, pen)],
            [s.prompt_token_ids if p else () for s, p in zip(samplers, pen)],
            [s.generator for s in samplers],
            self.device,
        )
        return samplers, self.sampler.sample(logits, sb)
