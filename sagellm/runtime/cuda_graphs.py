"""CUDA graphs for decode-only steps: one graph per batch-size bucket, over static input buffers.

A decode step of n sequences is padded to the smallest bucket >= n (padding rows are harmless,
see step_inputs) and replays that bucket's graph: the whole decoder stack in one launch instead of
a dozen kernel launches per layer from Python. The static inputs are laid out exactly as
step_inputs packs a step of `bucket` rows, so loading a step is one int64 copy straight into them
(ids, positions, slots, logit rows) plus one int32 copy whose seq_lens and block-table columns are
then copied into place on the device. The block table is [max_bucket, ceil(max_model_len /
block_size)]; columns a step does not write keep earlier, valid block ids, and no kernel reads
past a row's seq_len.

Graphs are captured at engine start, largest bucket first, into one shared memory pool: buckets
never run concurrently, so the smaller graphs' intermediates reuse the largest one's memory and
only each graph's output (hidden states, [bucket, hidden]) stays allocated. The LM head runs
after the replay on the sampled rows only, so no logits are computed for padding.

Without capture (the CPU), `run` executes the same padded forward eagerly: the tests use that to
check the padding on the CPU kernels.
"""

from __future__ import annotations

import bisect

import torch

from sagellm.models.base import CausalLM
from sagellm.models.layers.attention import AttentionMetadata, KVCache
from sagellm.runtime.step_inputs import HostBuffers, StepLayout

# Finer steps where padding is a large fraction of the batch.
_SMALL_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 24, 32, 48, ... (steps of 16 to 128, 32 to 256,
    then 64), cut at max_batch, which is always the last bucket."""
    if max_batch < 1:
        raise ValueError(f"max_batch = {max_batch} must be at least 1")
    sizes = list(_SMALL_BUCKETS)
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] + (32 if sizes[-1] < 256 else 64))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[KVCache],  # per layer: a tensor, or a QuantizedKVCache
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ):
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq = {max_blocks_per_seq} must be at least 1")
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buckets = graph_buckets(max_batch)
        self.max_batch, self.width = self.buckets[-1], max_blocks_per_seq
        top = self.max_batch
        full = StepLayout(top, top, max_blocks_per_seq, top)
        self.i64 = torch.zeros(full.i64_size, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(top, max_blocks_per_seq, dtype=torch.int32, device=device)
        # Decode: one token per row (no kernel reads it, but the metadata is complete).
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket that holds num_seqs rows, or None when the batch is too big."""
        i = bisect.bisect_left(self.buckets, num_seqs)
        return self.buckets[i] if i < len(self.buckets) else None

    # -- static inputs -------------------------------------------------------------------------
    def _inputs(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        lay = StepLayout(bucket, bucket, self.width, 0)  # where stage() puts a padded step
        meta = AttentionMetadata(
            slot_mapping=self.i64[lay.slots : lay.slots + bucket],
            block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            decode_only=True,
        )
        return self.i64[:bucket], self.i64[lay.positions : lay.positions + bucket], meta

    def logit_rows(self, bucket: int, count: int) -> torch.Tensor:
        start = StepLayout(bucket, bucket, self.width, count).logit_rows
        return self.i64[start : start + count]

    def load(self, buffers: HostBuffers, layout: StepLayout) -> None:
        """Copy a step staged with pad_to=bucket into the static inputs (asynchronously)."""
        b, w = layout.rows, layout.width
        if b not in self.buckets or layout.tokens != b or w > self.width:
            raise ValueError(
                f"a step of {layout.tokens} tokens, {b} rows and {w} block columns does not fit "
                f"the graph inputs (buckets {self.buckets}, {self.width} columns)"
            )
        self.i64[: layout.i64_size].copy_(buffers.i64[: layout.i64_size], non_blocking=True)
        i32 = buffers.i32[: layout.i32_size].to(self.device, non_blocking=True)
        self.seq_lens[:b].copy_(i32[:b])
        self.block_tables[:b, :w].copy_(i32[layout.block_tables :].view(b, w))

    def _pad_inputs(self, bucket: int) -> None:
        """Every row of `bucket` a padding row: what warm-up runs see (no cache writes)."""
        lay = StepLayout(bucket, bucket, self.width, 0)
        self.i64[: lay.slots].zero_()
        self.i64[lay.slots : lay.slots + bucket].fill_(-1)
        self.seq_lens[:bucket].fill_(1)
        self.block_tables[:bucket].zero_()

    # -- running -------------------------------------------------------------------------------
    def forward(self, bucket: int) -> torch.Tensor:
        """The decoder stack over the static inputs of `bucket` rows: [bucket, hidden]."""
        ids, positions, meta = self._inputs(bucket)
        return self.model(ids, positions, self.kv_caches, meta)

    def run(self, bucket: int) -> torch.Tensor:
        """Replay the bucket's graph (eager forward when not captured); [bucket, hidden]."""
        graph = self.graphs.get(bucket)
        if graph is None:
            return self.forward(bucket)
        with torch.cuda.device(self.device):
            graph.replay()
        self.num_replays += 1
        return self.hidden[bucket]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, into one memory pool."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device}")
        with torch.cuda.device(self.device):
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            for bucket in reversed(self.buckets):
                self._pad_inputs(bucket)
                # One eager run on the capture stream first: lazy initialisation (cuBLAS handles
                # and workspaces, kernel loading) must not happen inside the capture.
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.forward(bucket)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        hidden = self.forward(bucket)
                except RuntimeError as exc:
                    raise RuntimeError(
                        f"capturing the decode graph of batch {bucket} failed: {exc}. Something "
                        "in the forward pass waits for the device (.item(), .cpu(), a copy to "
                        "pageable memory) or sizes a tensor from device data; "
                        "EngineConfig(enforce_eager=True) runs without graphs"
                    ) from exc
                self.graphs[bucket], self.hidden[bucket] = graph, hidden
            torch.cuda.synchronize()
