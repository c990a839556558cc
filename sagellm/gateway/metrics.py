"""Prometheus metrics of one gateway app, in a registry of its own (two apps in one process, as
in the tests, never share counters).

Request-level figures come from the protocol Metrics each response carries; engine gauges (up,
running, waiting, KV usage) are read from the engine handles when /metrics is scraped, and so is
each engine's KV cache dtype and attention kernel (an info gauge: 1 with those as labels).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sagellm.protocol import Metrics

if TYPE_CHECKING:
    from sagellm.gateway.limits import AdmissionQueue

# Paths counted under their own label; anything else is "other" so random URLs cannot grow the
# label set without bound.
KNOWN_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/engine/generate",
    "/v1/engine/info",
    "/v1/engine/load",
    "/health",
    "/metrics",
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "sagellm_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.finished = Counter(
            "sagellm_request_finish",
            "Generated choices by finish reason",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "sagellm_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "sagellm_generation_tokens", "Generated tokens of finished requests", registry=r
        )
        self.prefix_hit_tokens = Counter(
            "sagellm_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "sagellm_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens, since start",
            registry=r,
        )
        self.ttft = Histogram(
            "sagellm_time_to_first_token_seconds",
            "Arrival to first output token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tbt = Histogram(
            "sagellm_time_between_tokens_seconds",
            "Mean time between output tokens, per request",
            buckets=_TBT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "sagellm_request_duration_seconds",
            "Gateway arrival to the last byte of the response",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "sagellm_queue_depth", "Requests waiting for an admission slot", registry=r
        )
        self.running = Gauge(
            "sagellm_requests_running", "Requests holding an admission slot", registry=r
        )
        labels = ["engine_id", "model"]
        self.engine_up = Gauge(
            "sagellm_engine_up", "1 when the engine is READY", labels, registry=r
        )
        self.engine_running = Gauge(
            "sagellm_engine_running", "Sequences the engine is running", labels, registry=r
        )
        self.engine_waiting = Gauge(
            "sagellm_engine_waiting", "Sequences waiting in the engine", labels, registry=r
        )
        self.kv_usage = Gauge(
            "sagellm_kv_cache_usage_ratio", "KV cache blocks in use / total", labels, registry=r
        )
        self.kv_info = Gauge(
            "sagellm_kv_cache_info",
            "1 per engine, labelled with its KV cache dtype and the attention kernel it runs",
            [*labels, "dtype", "attention_kernel"],
            registry=r,
        )
        self._prompt_total = 0
        self._hit_total = 0.0

    def observe_choice(self, reason: str | None) -> None:
        self.finished.labels(reason or "unknown").inc()

    def observe_request(self, prompt_tokens: int, completion_tokens: int, m: Metrics) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        hits = m.prefix_hit_rate * prompt_tokens
        self.prefix_hit_tokens.inc(hits)
        self._prompt_total += prompt_tokens
        self._hit_total += hits
        if self._prompt_total:
            self.prefix_hit_rate.set(self._hit_total / self._prompt_total)
        if m.ttft_ms > 0:
            self.ttft.observe(m.ttft_ms / 1e3)
        if m.tbt_ms > 0:
            self.tbt.observe(m.tbt_ms / 1e3)

    def render(self, engines, admission: AdmissionQueue) -> bytes:
        self.queue_depth.set(admission.waiting)
        self.running.set(admission.running)
        self.kv_info.clear()  # an engine restarted with another KV dtype must not show both
        for h in engines:
            labels = (h.engine_id, h.model)
            info = _kv_info(h)
            if info is not None:
                self.kv_info.labels(*labels, *info).set(1)
            self.engine_up.labels(*labels).set(1 if _state_name(h) == "READY" else 0)
            try:
                load = h.load()
            except Exception:  # an engine that cannot say its load is reported down, not fatal
                self.engine_up.labels(*labels).set(0)
                continue
            self.engine_running.labels(*labels).set(load.running)
            self.engine_waiting.labels(*labels).set(load.waiting)
            self.kv_usage.labels(*labels).set(load.kv_usage)
        return generate_latest(self.registry)


def _kv_info(handle) -> tuple[str, str] | None:
    """(KV dtype, attention kernel) from the engine's info, None while it has not said."""
    try:
        info = handle.info()
    except Exception:  # an engine that cannot describe itself just has no info gauge
        return None
    if "kv_cache_dtype" not in info:
        return None
    return str(info["kv_cache_dtype"]), str(info.get("attention_kernel", "unknown"))


def _state_name(handle) -> str:
    state = handle.state
    return getattr(state, "name", str(state)).upper()


class RequestCounterMiddleware:
    """Counts every HTTP response by path and status (413s and 401s included) and its duration."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = {"code": 500}

        async def send_wrapper(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, str(status["code"])).inc()
            if path.startswith("/v1/") and path != "/v1/models":
                self.metrics.e2e.observe(time.monotonic() - t0)
