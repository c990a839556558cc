"""Turns a scheduled batch into one packed forward pass, then samples.

Owns the model, its paged KV cache (one [2, num_blocks, block_size, kv_heads, head_size] tensor
per layer), the sampler, the reusable host buffers a step is packed into (step_inputs) and, on
CUDA, the decode graphs (cuda_graphs). Inputs are packed without padding: the step's new tokens of
every sequence one after another, with the per-step metadata every layer shares; only a
decode-only step that replays a CUDA graph is padded to the graph's batch size.

On CUDA a step never waits for the device until it reads the sampled tokens: inputs go up from
pinned buffers with asynchronous copies (two sets, used in turn, each guarded by an event so it
is not rewritten while its copy may be in flight), sampling runs on the device, and its results
come back in one batch of asynchronous copies followed by a single wait.
"""

from __future__ import annotations

import torch

from sagellm.models.base import CausalLM
from sagellm.models.layers.attention import AttentionMetadata
from sagellm.runtime.cuda_graphs import DecodeGraphs
from sagellm.runtime.sampler import Sampler, SamplerOutput, SamplingBatch
from sagellm.runtime.scheduler import ScheduledBatch
from sagellm.runtime.sequence import Sequence
from sagellm.runtime.step_inputs import BlockRows, HostBuffers, StagedStep, stage


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
        cuda = device.type == "cuda"
        # On the CPU never read before written: the kernels only look at slots below each seq_len.
        # On CUDA zeroed (one memset): padding rows of graph steps read slot 0 of block 0.
        alloc = torch.zeros if cuda else torch.empty
        self.kv_caches = [
            alloc(shape, dtype=self.kv_dtype, device=device) for _ in range(model.num_layers)
        ]
        self.sampler = Sampler()
        self.block_rows = BlockRows()
        self._host = [HostBuffers(pin=cuda) for _ in range(2 if cuda else 1)]
        self._copied = [torch.cuda.Event() if cuda else None for _ in self._host]
        self._turn = 0
        self._fetched = torch.cuda.Event() if cuda else None
        self.graphs: DecodeGraphs | None = None
        self.num_graph_steps = 0
        self.num_eager_steps = 0

    def kv_cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.kv_caches)

    # -- CUDA graphs ---------------------------------------------------------------------------
    def setup_decode_graphs(self, max_batch: int, max_model_len: int, capture: bool) -> None:
        """Run decode-only steps of up to max_batch sequences through static, padded inputs;
        capture: record one CUDA graph per bucket now (else the padded forward runs eagerly,
        which is what the CPU tests exercise)."""
        width = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_batch, width, self.device)
        if capture:
            self.graphs.capture()

    @property
    def num_graph_replays(self) -> int:
        return self.graphs.num_replays if self.graphs is not None else 0

    # -- one step ------------------------------------------------------------------------------
    def _buffers(self) -> tuple[HostBuffers, torch.cuda.Event | None]:
        i = self._turn
        self._turn = (i + 1) % len(self._host)
        event = self._copied[i]
        if event is not None:
            event.synchronize()  # the copy that last read this set is done (normally long ago)
        return self._host[i], event

    def _graph_bucket(self, batch: ScheduledBatch) -> int | None:
        g = self.graphs
        if g is None or len(batch.seqs) > g.max_batch:
            return None
        if any(n != 1 for n in batch.num_new_tokens):
            return None
        if max(len(s.block_ids) for s in batch.seqs) > g.width:
            return None
        return g.bucket(len(batch.seqs))

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[Sequence]]:
        """The step as device tensors for an eager forward: (input_ids [T], positions [T],
        metadata, logit_rows [num sampled], sequences that sample)."""
        host, event = self._buffers()
        step = stage(batch, host, self.block_rows, self.block_size)
        lay = step.layout
        i64, i32 = host.i64[: lay.i64_size], host.i32[: lay.i32_size]
        if self.device.type != "cpu":
            i64 = i64.to(self.device, non_blocking=True)
            i32 = i32.to(self.device, non_blocking=True)
            if event is not None:
                event.record(torch.cuda.current_stream(self.device))
        t, s = step.num_tokens, step.num_seqs
        meta = AttentionMetadata(
            slot_mapping=i64[lay.slots : lay.slots + t],
            block_tables=i32[lay.block_tables :].view(s, lay.width),
            seq_lens=i32[:s],
            query_start_loc=i32[lay.query_start_loc : lay.query_start_loc + s + 1],
            decode_only=step.decode_only,
        )
        rows = i64[lay.logit_rows : lay.logit_rows + lay.num_logits]
        return i64[:t], i64[lay.positions : lay.positions + t], meta, rows, step.samplers

    def _run_graph(self, batch: ScheduledBatch, bucket: int) -> tuple[torch.Tensor, StagedStep]:
        """Hidden states of the sampled rows, from the bucket's graph."""
        host, event = self._buffers()
        step = stage(batch, host, self.block_rows, self.block_size, pad_to=bucket)
        self.graphs.load(host, step.layout)
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))
        hidden = self.graphs.run(bucket)
        if step.logits_are_prefix:
            return hidden[: step.num_seqs], step
        return hidden[self.graphs.logit_rows(bucket, step.layout.num_logits)], step

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        bucket = self._graph_bucket(batch)
        if bucket is not None:
            hidden, step = self._run_graph(batch, bucket)
            samplers = step.samplers
            self.num_graph_steps += 1
        else:
            ids, pos, meta, rows, samplers = self.prepare(batch)
            hidden = self.model(ids, pos, self.kv_caches, meta)
            if samplers:
                hidden = hidden[rows]
            self.num_eager_steps += 1
        if not samplers:
            return [], None
        logits = self.model.compute_logits(hidden)
        # Token histories only matter to penalties: don't copy them for the other rows.
        pen = [s.params.uses_penalties for s in samplers]
        sb = SamplingBatch.build(
            [s.params for s in samplers],
            [s.output_token_ids if p else () for s, p in zip(samplers, pen)],
            [s.prompt_token_ids if p else () for s, p in zip(samplers, pen)],
            [s.generator for s in samplers],
            self.device,
        )
        return samplers, self._fetch(self.sampler.sample(logits, sb))

    def _fetch(self, out: SamplerOutput) -> SamplerOutput:
        """On CUDA: the results in host memory, after the step's single wait for the device."""
        if self._fetched is None:
            return out

        def host(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "cpu":
                return t
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return h.copy_(t, non_blocking=True)

        tokens = host(out.token_ids)
        logprobs = host(out.logprobs) if out.logprobs is not None else None
        top = None
        if out.top_logprobs is not None:
            top = (host(out.top_logprobs[0]), host(out.top_logprobs[1]))
        self._fetched.record(torch.cuda.current_stream(self.device))
        self._fetched.synchronize()
        return SamplerOutput(tokens, logprobs, top)
