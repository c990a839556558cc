"""The engine: requests in, tokens and text out, one scheduled step at a time.

    engine = LLMEngine(EngineConfig(model="path/or/id"))
    engine.add_request("Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...

or `engine.generate(prompts, params)` for an offline batch.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq

import torch

from sagellm.models.checkpoint import load_checkpoint
from sagellm.models.layers.quant_weights import quantize_for_checkpoint, weight_kernels
from sagellm.models.registry import build_model
from sagellm.runtime.block_manager import BlockManager
from sagellm.runtime.config import DTYPES, EngineConfig
from sagellm.runtime.detokenizer import IncrementalDetokenizer
from sagellm.runtime.errors import ContextLengthExceeded, KVBudgetImpossible, RequestError
from sagellm.runtime.metrics import EngineCounters, peak_memory_mb, request_metrics
from sagellm.runtime.model_runner import (
    ModelRunner,
    attention_kernel_name,
    check_kv_cache_support,
    kv_bytes_per_token,
    kv_dtype_name,
)
from sagellm.runtime.outputs import RequestOutput, TokenLogprob
from sagellm.runtime.params import SamplingParams
from sagellm.runtime.sampler import make_generators
from sagellm.runtime.scheduler import Scheduler
from sagellm.runtime.sequence import Sequence, SequenceStatus
from sagellm.runtime.stop import StopChecker

_CPU_KV_CAP_BYTES = 4 * 2**30
log = logging.getLogger("sagellm.runtime")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        self.config = config = config or EngineConfig(**overrides)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = config.resolved_device()
        t0 = time.perf_counter()
        self.executor = None
        try:
            if config.tensor_parallel_size > 1:
                from sagellm.runtime.tp_executor import TPExecutor

                # Rank 0 of N: starts (or joins) the workers; every rank reads only its slices.
                self.executor = TPExecutor(config)
                self.device = self.executor.device
                ckpt = self.executor.checkpoint
            else:
                ckpt = load_checkpoint(
                    config.model,
                    dtype=lambda cfg, fmt: config.resolved_dtype(
                        DTYPES.get(cfg.torch_dtype), fmt, self.device
                    ),
                    revision=config.revision,
                    trust_remote_code=config.trust_remote_code,
                    progress=config.load_progress,
                    # "auto" keeps a GGUF file's block weights as stored wherever gguf_linear runs
                    # them on this device; a dtype named explicitly asks for dense weights.
                    quantized_on=self.device if config.dtype == "auto" else None,
                )
            self.model_config, self.tokenizer = ckpt.config, ckpt.tokenizer
            self.source, self.format, self.dtype = ckpt.source, ckpt.format, ckpt.dtype
            # stored weight type -> (kernel, tensors): what `sage-llm info` and the load log name
            self.weight_kernels = ckpt.weight_kernels
            if self.executor is not None:
                self.model = self.executor.model
            else:
                self.model = build_model(ckpt.config, self.dtype, self.device)
                # --quantization, or an AWQ / GPTQ checkpoint: the Linears switch to a quantized
                # weight method before anything is loaded.
                quantize_for_checkpoint(self.model, config.quantization, ckpt)
                self.model.load_weights(ckpt.weights.items())
            self.quantization = getattr(self.model, "quantization", None)
            if self.quantization:
                self.weight_kernels = {**self.weight_kernels, **weight_kernels(self.model)}
                log.info(
                    "weights quantized at load: %s (%s)", self.quantization, self.weight_kernels
                )
            del ckpt  # the weights are in the model now
            self.load_time_s = time.perf_counter() - t0

            max_pos = self.model_config.max_position
            self.max_model_len = min(config.max_model_len or max_pos, max_pos)
            # The KV storage: refused here, with the kernels' reason, if this device cannot run it.
            self.kv_dtype = config.resolved_kv_dtype(self.dtype)
            check_kv_cache_support(self.model, self.kv_dtype, self.device)
            self.kv_cache_dtype = kv_dtype_name(self.kv_dtype)
            self.attention_kernel = attention_kernel_name(self.device, self.kv_dtype)
            self._kv_bytes_per_token = kv_bytes_per_token(self.model, self.kv_dtype)
            bs = config.block_size
            num_blocks = self._num_blocks()
            self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
            self.scheduler = Scheduler(
                self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
            )
            if self.executor is not None:
                self.runner = self.executor.make_runner(num_blocks, bs, self.kv_dtype)
            else:
                self.runner = ModelRunner(self.model, num_blocks, bs, self.device, self.kv_dtype)
            log.info(
                "KV cache: %s, %d blocks x %d tokens (%d bytes per token, %.1f MiB); attention: %s",
                self.kv_cache_dtype,
                num_blocks,
                bs,
                self._kv_bytes_per_token,
                self.runner.kv_cache_bytes() / 2**20,
                self.attention_kernel,
            )
            self.graph_capture_s = 0.0
            self.graph_memory_mb = 0.0
            # Not under tensor parallelism: capturing runs the forward (and its collectives) on
            # rank 0 alone, while the workers wait for a step.
            if self.device.type == "cuda" and not config.enforce_eager and self.executor is None:
                self._capture_graphs()
            self.eos_token_ids = set(self.tokenizer.eos_token_ids)
            self.counters = EngineCounters()
            self._requests: dict[str, list[Sequence]] = {}
            self._ids = itertools.count()
        except BaseException:
            self.close()  # a failed start must not leave tensor-parallel workers behind
            raise

    # -- sizing ------------------------------------------------------------------------------
    def _num_blocks(self) -> int:
        cfg = self.config
        per_block = self._kv_bytes_per_token * cfg.block_size
        if cfg.kv_cache_memory_gb is not None:
            budget = int(cfg.kv_cache_memory_gb * 2**30)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.kv_cache_fraction)
        else:
            budget = min(_available_ram() // 4, _CPU_KV_CAP_BYTES)
        blocks_per_seq = -(-self.max_model_len // cfg.block_size)
        # More than every sequence at full length can never be used.
        num_blocks = min(budget // per_block, blocks_per_seq * cfg.max_num_seqs + 1)
        if num_blocks < 2:
            raise ValueError(
                f"a KV cache of {budget / 2**20:.1f} MiB holds {budget // per_block} blocks of "
                f"{cfg.block_size} tokens ({per_block} bytes each); at least 2 are needed"
            )
        return int(num_blocks)

    def _capture_graphs(self) -> None:
        """Decode-only steps of up to cuda_graph_max_batch sequences replay CUDA graphs; a decode
        batch can never exceed max_num_seqs nor the step's token budget."""
        cfg = self.config
        largest = min(cfg.cuda_graph_max_batch, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # so that the growth below is the graphs' own memory pool
        before = torch.cuda.memory_reserved(self.device)
        self.runner.setup_decode_graphs(largest, self.max_model_len, capture=True)
        self.graph_memory_mb = (torch.cuda.memory_reserved(self.device) - before) / 2**20
        self.graph_capture_s = time.perf_counter() - t0

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine cannot step afterwards."""
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            for i, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise RequestError(f"prompt[{i}] = {t!r} is not a token id in [0, {vocab})")
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        arrival: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises RequestError (with a protocol code)."""
        params = params or SamplingParams()
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RequestError(f"priority = {priority!r} is invalid: expected an integer")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self._requests:  # a caller may have picked the same name
                request_id = f"req-{next(self._ids)}"
        elif request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        ids = self.encode_prompt(prompt)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                f"{total} tokens exceed the model's limit of {self.max_model_len}"
            )
        usable = (
            self.block_manager.num_blocks - self.block_manager.watermark
        ) * self.config.block_size
        if total > usable:
            raise KVBudgetImpossible(
                f"the request needs up to {total} KV cache tokens but the cache holds {usable}"
            )
        gens = make_generators(params.seed, params.n, self.device)
        seqs = []
        for i in range(params.n):
            seq = Sequence(
                request_id, i, ids, params, arrival=arrival, priority=priority, generator=gens[i]
            )
            seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seq.stop = (
                StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
            )
            seqs.append(seq)
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        self.counters.requests_added += 1
        self.counters.prompt_tokens += len(ids)
        return request_id

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now and free its blocks; returns its final outputs (reason 'abort')."""
        seqs = self._requests.get(request_id)
        if not seqs:
            return []
        outs = []
        for seq in seqs:
            if not seq.is_finished:
                outs.append(self._finish(seq, "abort", delta="", new_ids=[]))
        self.counters.requests_aborted += 1
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.counters.preemptions = self.scheduler.num_preemptions
        if not batch.seqs:
            return []
        samplers, out = self.runner.execute(batch)
        now = time.monotonic()
        self.counters.steps += 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        if out is None:
            return []
        tokens = out.token_ids.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        tops = None
        if out.top_logprobs is not None:
            tops = (out.top_logprobs[0].tolist(), out.top_logprobs[1].tolist())
        results = []
        for i, seq in enumerate(samplers):
            lp = None
            if seq.params.logprobs is not None and lps is not None:
                k = seq.params.logprobs
                top = list(zip(tops[1][i][:k], tops[0][i][:k])) if tops and k else []
                lp = [TokenLogprob(tokens[i], lps[i], top)]
            results.append(self._append_token(seq, tokens[i], now, lp))
        return results

    def _append_token(self, seq: Sequence, token: int, now: float, lp) -> RequestOutput:
        p = seq.params
        seq.token_ids.append(token)
        seq.times.token_times.append(now)
        if seq.times.first_token is None:
            seq.times.first_token = now
        self.counters.generated_tokens += 1
        finish, delta = None, ""
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            finish = "stop"
        else:
            delta = seq.detok.add_tokens([token])
            seq.text += delta
        safe = len(seq.text)
        if finish is None and seq.stop is not None:
            # Even a step that adds no text must not release text held back as a possible
            # stop-string start.
            m = seq.stop.check(seq.text, len(delta))
            if m.stopped:
                seq.text = seq.text[: m.end]
                finish = "stop"
            safe = m.end if m.stopped else m.safe_len
        stopped_by_string = finish == "stop" and seq.stop is not None and bool(delta)
        if finish is None and (
            seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            finish = "length"
        if finish is not None:
            if not stopped_by_string:
                seq.text += seq.detok.flush()  # bytes that never completed a character
            safe = len(seq.text)
        emit = seq.text[seq.emitted_chars : safe]
        seq.emitted_chars = max(seq.emitted_chars, safe)
        if finish is not None:
            return self._finish(seq, finish, delta=emit, new_ids=[token], logprobs=lp)
        return RequestOutput(
            seq.request_id,
            seq.index,
            emit,
            [token],
            seq.text,
            seq.output_token_ids,
            seq.num_prompt_tokens,
            logprobs=lp,
        )

    def _finish(
        self, seq: Sequence, reason: str, *, delta: str, new_ids: list[int], logprobs=None
    ) -> RequestOutput:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.times.finished = time.monotonic()
        if reason == "abort":
            delta = seq.text[seq.emitted_chars :]
            seq.emitted_chars = len(seq.text)
        metrics = request_metrics(
            seq, self.config.block_size, self._kv_bytes_per_token, self.device
        )
        seqs = self._requests.get(seq.request_id, [])
        if all(s.is_finished for s in seqs):
            self._requests.pop(seq.request_id, None)
            if reason != "abort":
                self.counters.requests_finished += 1
        return RequestOutput(
            seq.request_id,
            seq.index,
            delta,
            new_ids,
            seq.text,
            seq.output_token_ids,
            seq.num_prompt_tokens,
            finished=True,
            finish_reason=reason,
            metrics=metrics,
            logprobs=logprobs,
        )

    # -- offline batches ---------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Seq[int] | Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch to completion; one final output per prompt (per choice when n > 1),
        carrying the logprobs of every generated token when they were asked for.

        A single string (or one list of token ids) is one prompt. If any prompt is refused,
        nothing of the batch is left queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        rids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                rids.append(self.add_request(p, sp))
        except Exception:
            for rid in rids:
                self.abort(rid)
            raise
        final: dict[tuple[str, int], RequestOutput] = {}
        logprobs: dict[tuple[str, int], list] = {}
        while self.has_unfinished():
            for o in self.step():
                key = (o.request_id, o.index)
                if o.logprobs:
                    logprobs.setdefault(key, []).extend(o.logprobs)
                if o.finished:
                    o.logprobs = logprobs.pop(key, o.logprobs)
                    final[key] = o
        return [final[(rid, i)] for rid, sp in zip(rids, params) for i in range(sp.n)]

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_cached": bm.allocator.num_cached,
            "kv_usage": bm.usage(),
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_cache_dtype": self.kv_cache_dtype,
            "attention_kernel": self.attention_kernel,
            "prefix_hit_rate": bm.prefix_hit_rate(),
            "peak_mem_mb": peak_memory_mb(self.device),
            "cuda_graph_replays": self.runner.num_graph_replays,
            **vars(self.counters),
        }
