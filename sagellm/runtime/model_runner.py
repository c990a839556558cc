"""Turns a scheduled batch into one packed forward pass, then samples.

Owns the model, its paged KV cache (one [2, num_blocks, block_size, kv_heads, head_size] tensor
per layer, or with an int8 / float8_e4m3fn cache a QuantizedKVCache of that tensor plus its fp32
scales [2, num_blocks, block_size, kv_heads]), the sampler, the reusable host buffers a step is packed into (step_inputs) and, on
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

from sagellm import ops
from sagellm.models.base import CausalLM
from sagellm.models.layers.attention import AttentionMetadata, KVCache, QuantizedKVCache
from sagellm.ops import attention as attn_ops
from sagellm.ops import cache as cache_ops
from sagellm.runtime.config import KV_CACHE_DTYPES
from sagellm.runtime.cuda_graphs import DecodeGraphs
from sagellm.runtime.sampler import Sampler, SamplerOutput, SamplingBatch
from sagellm.runtime.scheduler import ScheduledBatch
from sagellm.runtime.sequence import Sequence
from sagellm.runtime.step_inputs import BlockRows, HostBuffers, StagedStep, stage

QUANTIZED_KV_DTYPES = tuple(KV_CACHE_DTYPES.values())
_KV_NAMES = {dtype: name for name, dtype in KV_CACHE_DTYPES.items()}


def kv_dtype_name(kv_dtype: torch.dtype) -> str:
    """int8, fp8_e4m3, or the model dtype's name (float32, bfloat16, float16)."""
    return _KV_NAMES.get(kv_dtype) or str(kv_dtype).removeprefix("torch.")


def kv_bytes_per_token(model: CausalLM, kv_dtype: torch.dtype) -> int:
    """Cache bytes one token takes over all layers: with a quantized cache one byte per element
    plus one fp32 scale per KV head, for keys and values."""
    if kv_dtype in QUANTIZED_KV_DTYPES:
        return 2 * model.num_layers * model.num_kv_heads * (model.head_size + 4)
    return model.kv_bytes_per_token(kv_dtype)


def attention_kernel_name(device: torch.device, kv_dtype: torch.dtype) -> str:
    """Which paged-attention kernel a step runs, e.g. "cpu-avx512 paged attention, int8 KV"."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"cuda-sm{major}{minor}"
    else:
        where = f"cpu-{ops.cpu_isa()}"
    return f"{where} paged attention, {kv_dtype_name(kv_dtype)} KV"


def allocate_kv_cache(
    model: CausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype, device
) -> KVCache:
    """One layer's cache. On the CPU never read before written: the kernels only look at slots
    below each seq_len. On CUDA zeroed (one memset): padding rows of graph steps read slot 0 of
    block 0 (a zero scale there dequantizes to zeros)."""
    return _alloc_layer(model.kv_cache_shape(num_blocks, block_size), kv_dtype, device)


def _alloc_layer(shape, kv_dtype: torch.dtype, device) -> KVCache:
    alloc = torch.zeros if torch.device(device).type == "cuda" else torch.empty
    data = alloc(shape, dtype=kv_dtype, device=device)
    if kv_dtype not in QUANTIZED_KV_DTYPES:
        return data
    return QuantizedKVCache(data, alloc(shape[:-1], dtype=torch.float32, device=device))


def probe_kv_cache(
    kv_dtype: torch.dtype, model_dtype: torch.dtype, num_kv_heads: int, head_size: int, device
) -> str | None:
    """Runs one cache write and one decode step of this head shape through the device's kernels
    with this KV dtype; None when they run and give the right answer, else the reason."""
    try:
        layer = _alloc_layer((2, 1, 1, num_kv_heads, head_size), kv_dtype, device)
        quantized = isinstance(layer, QuantizedKVCache)
        data = layer.data if quantized else layer
        kw = {"k_scales": layer.scales[0], "v_scales": layer.scales[1]} if quantized else {}
        x = torch.ones(1, num_kv_heads, head_size, dtype=model_dtype, device=device)
        slots = torch.zeros(1, dtype=torch.int64, device=device)
        cache_ops.reshape_and_cache(x, x, data[0], data[1], slots, **kw)
        table = torch.zeros(1, 1, dtype=torch.int32, device=device)
        lens = torch.ones(1, dtype=torch.int32, device=device)
        out = attn_ops.paged_attention_decode(x, data[0], data[1], table, lens, 1.0, **kw)
    except (RuntimeError, NotImplementedError) as e:
        return " ".join(str(e).split())
    if not torch.allclose(out.float(), x.float(), atol=1e-2):
        return "the kernels gave a wrong result in the start-up check"
    return None


def check_kv_cache_support(model: CausalLM, kv_dtype: torch.dtype, device: torch.device) -> None:
    """Refuses at start-up, with the kernels' reason, a KV dtype this device's kernels cannot
    run for the model's head shape (a head size they lack, a quantized cache on a build without
    it), instead of failing at the first step."""
    reason = probe_kv_cache(kv_dtype, model.dtype, model.num_kv_heads, model.head_size, device)
    if reason is not None:
        raise ValueError(
            f"the KV cache dtype {kv_dtype_name(kv_dtype)} cannot run here (head_size "
            f"{model.head_size}, {model.num_kv_heads} KV heads, model dtype {model.dtype}, "
            f"device {device}): {reason}"
        )


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
        # The model dtype, or int8 / float8_e4m3fn for a quantized cache.
        self.kv_dtype = kv_dtype or model.dtype
        cuda = device.type == "cuda"
        self.kv_caches: list[KVCache] = [
            allocate_kv_cache(model, num_blocks, block_size, self.kv_dtype, device)
            for _ in range(model.num_layers)
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
        return sum(
            c.nbytes() if isinstance(c, QuantizedKVCache) else c.numel() * c.element_size()
            for c in self.kv_caches
        )

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
