"""`LocalEngine`: an engine in this process (LLMEngine stepped by AsyncLLMEngine's thread)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from sagellm.control_plane.config import BackendConfig, EngineConfig
from sagellm.control_plane.handle import (
    EngineHandle,
    EngineLoad,
    EngineState,
    StreamItem,
    default_engine_id,
)
from sagellm.protocol import (
    ErrorCode,
    Metrics,
    ProtocolError,
    Request,
    StreamDelta,
    StreamEnd,
    StreamStart,
    TokenLogprob,
    Usage,
)

log = logging.getLogger("sagellm.control_plane")

# RequestMetrics fields that Protocol Metrics carries under the same name.
_METRIC_FIELDS = (
    "ttft_ms",
    "tbt_ms",
    "tpot_ms",
    "throughput_tps",
    "peak_mem_mb",
    "kv_used_tokens",
    "kv_used_bytes",
    "prefix_hit_rate",
    "evict_count",
    "evict_ms",
)


def protocol_metrics(m) -> Metrics:
    """runtime RequestMetrics -> protocol Metrics (clamped so rounding can never fail validation)."""
    if m is None:
        return Metrics()
    values = {f: max(0, getattr(m, f)) for f in _METRIC_FIELDS}
    values["prefix_hit_rate"] = min(1.0, values["prefix_hit_rate"])
    return Metrics(**values)


def sampling_params(request: Request, max_tokens: int | None = None):
    """protocol Request -> SamplingParams; a bad value is ProtocolError(INVALID_ARGUMENT)."""
    from sagellm.runtime.params import SamplingParams

    try:
        return SamplingParams(
            max_tokens=max_tokens or request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=request.seed,
            n=request.n,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            logprobs=request.logprobs,
        )
    except ValueError as e:
        raise ProtocolError(ErrorCode.INVALID_ARGUMENT, str(e)) from None


class LocalEngine(EngineHandle):
    kind = "native"

    def __init__(
        self,
        config: EngineConfig | None = None,
        backend: BackendConfig | None = None,
        *,
        stall_timeout_s: float = 120.0,
    ):
        self.config = config or EngineConfig()
        self.backend = backend or BackendConfig()
        self.engine_id = self.config.engine_id or default_engine_id("local")
        self.model = self.config.served_name()
        self.state = EngineState.STARTING
        self._runtime_config = self.config.runtime_config(self.backend)  # validates early
        self._engine = None  # LLMEngine
        self._async = None  # AsyncLLMEngine
        # A thread that is alive but makes no step while requests wait is as dead as a crashed one.
        self.stall_timeout_s = stall_timeout_s
        self._progress = (-1, 0.0)  # (steps seen, when they last changed)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        from sagellm.runtime.async_engine import AsyncLLMEngine
        from sagellm.runtime.engine import LLMEngine

        self.state = EngineState.STARTING
        t0 = time.perf_counter()
        # Loading weights takes seconds; a worker thread keeps the event loop serving meanwhile.
        engine = await asyncio.to_thread(LLMEngine, self._runtime_config)
        self._engine, self._async = engine, AsyncLLMEngine(engine)
        self.state = EngineState.READY
        log.info(
            "engine %s ready: %s (%s) in %.1f s",
            self.engine_id,
            self.model,
            engine.source,
            time.perf_counter() - t0,
        )

    async def stop(self, drain_timeout_s: float = 30) -> None:
        aeng = self._async
        self.state = EngineState.STOPPED
        if aeng is None:
            return
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        while aeng.is_running and aeng.num_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # Requests still running now end with EngineDeadError -> ProtocolError(UNAVAILABLE).
        await asyncio.to_thread(aeng.shutdown)
        self._async = self._engine = None

    async def restart(self) -> None:
        """Rebuild the engine: whatever the old one still runs ends with UNAVAILABLE."""
        old, self._async, self._engine = self._async, None, None
        self.state = EngineState.STARTING
        if old is not None:
            await asyncio.to_thread(old.shutdown)
        await self.start()

    async def health(self) -> bool:
        aeng = self._async
        if self.state != EngineState.READY or aeng is None or not aeng.is_running:
            return False
        steps, now = aeng.engine.counters.steps, time.monotonic()
        if steps != self._progress[0] or not aeng.num_in_flight():
            self._progress = (steps, now)
            return True
        return now - self._progress[1] < self.stall_timeout_s

    # -- introspection -------------------------------------------------------------------------
    def load(self) -> EngineLoad:
        aeng = self._async
        if aeng is None:
            return EngineLoad()
        s = aeng.stats()
        return EngineLoad(
            running=s["running"],
            waiting=s["waiting"],
            kv_usage=float(s["kv_usage"]),
            in_flight=aeng.num_in_flight(),
        )

    def info(self) -> dict[str, Any]:
        base = {"engine_id": self.engine_id, "model": self.model, "kind": self.kind}
        eng = self._engine
        if eng is None:
            return {**base, "state": self.state.value}
        from sagellm import ops

        tok = eng.tokenizer
        return {
            **base,
            "state": self.state.value,
            "source": str(eng.source),
            "format": eng.format,
            "model_type": eng.model_config.hf_config.get("model_type"),
            "architecture": eng.model_config.architecture,
            "dtype": str(eng.dtype).removeprefix("torch."),
            "device": str(eng.device),
            "max_model_len": eng.max_model_len,
            "block_size": eng.config.block_size,
            "kv_blocks": eng.num_blocks,
            "kv_capacity_tokens": eng.kv_capacity_tokens,
            "kv_cache_dtype": eng.kv_cache_dtype,
            "attention_kernel": eng.attention_kernel,
            "max_num_seqs": eng.config.max_num_seqs,
            "max_num_batched_tokens": eng.config.max_num_batched_tokens,
            "enable_prefix_caching": eng.config.enable_prefix_caching,
            "eos_token_ids": sorted(tok.eos_token_ids) if tok is not None else [],
            "has_chat_template": bool(tok is not None and tok.has_chat_template),
            "load_time_s": round(eng.load_time_s, 3),
            "kernels": {"cpu_isa": ops.cpu_isa(), **ops.build_info()},
        }

    def stats(self) -> dict[str, Any]:
        """The engine's counters (blocks used and cached, tokens, steps...); {} when not running."""
        return self._async.stats() if self._async is not None else {}

    def tokenizer(self):
        return self._engine.tokenizer if self._engine is not None else None

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, request: Request) -> AsyncIterator[StreamItem]:
        from sagellm.runtime.async_engine import EngineDeadError
        from sagellm.runtime.errors import RequestError

        aeng, engine = self._async, self._engine
        if self.state != EngineState.READY or aeng is None or not aeng.is_running:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"engine {self.engine_id} is {self.state.value.lower()}"
            )
        prompt, max_tokens = request.prompt, request.max_tokens
        if request.kv_budget_tokens is not None:
            prompt, max_tokens = self._apply_kv_budget(engine, request)
        params = sampling_params(request, max_tokens)
        ids = dict(request_id=request.request_id, trace_id=request.trace_id)
        stream = aeng.generate(prompt, params, request.request_id, priority=request.priority)
        started = False
        try:
            async for out in stream:
                if not started:
                    started = True
                    yield StreamStart(
                        **ids, engine_id=self.engine_id, prompt_tokens=out.num_prompt_tokens
                    )
                if out.delta_text or out.new_token_ids:
                    yield StreamDelta(
                        **ids,
                        engine_id=self.engine_id,
                        index=out.index,
                        chunk=out.delta_text,
                        chunk_tokens=out.new_token_ids,
                        logprobs=[
                            TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=lp.top)
                            for lp in out.logprobs
                        ]
                        if out.logprobs
                        else None,
                    )
                if out.finished:
                    yield StreamEnd(
                        **ids,
                        engine_id=self.engine_id,
                        index=out.index,
                        output_text=out.text,
                        output_tokens=out.token_ids,
                        finish_reason=out.finish_reason,
                        metrics=protocol_metrics(out.metrics),
                        usage=Usage(
                            prompt_tokens=out.num_prompt_tokens,
                            completion_tokens=len(out.token_ids),
                        ),
                    )
        except RequestError as e:
            raise ProtocolError(e.code, str(e)) from None
        except EngineDeadError as e:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"engine {self.engine_id} stopped: {e}"
            ) from None
        finally:
            await stream.aclose()  # aborts the request in the engine when it did not finish

    def _apply_kv_budget(self, engine, request: Request) -> tuple[list[int], int]:
        """kv_budget_tokens caps the KV tokens the request may hold: prompt + generated."""
        from sagellm.runtime.errors import RequestError

        try:
            ids = engine.encode_prompt(request.prompt)
        except RequestError as e:
            raise ProtocolError(e.code, str(e)) from None
        budget = request.kv_budget_tokens
        if len(ids) >= budget:
            raise ProtocolError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the prompt has {len(ids)} tokens, kv_budget_tokens = {budget} leaves no room "
                "for output",
            )
        return ids, min(request.max_tokens, budget - len(ids))
