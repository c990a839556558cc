"""Open-loop serving benchmark: streaming POST /v1/completions at a request rate, against a
running server (`--url`) or one started in this process (`--spawn-model`).

Arrivals are Poisson at `rate` requests/s (or all at once for rate = inf) and do not wait for
earlier responses, so a server slower than the offered load shows it as growing TTFT rather
than as a lower request rate. Per request it measures TTFT (send to the first chunk with text),
TBT (gaps between text chunks), end-to-end latency and the token counts of the final usage chunk.

The bench layer may not import the gateway (import-linter), so `--spawn-model` needs the caller
to pass `app_factory(manager) -> ASGI app`; benchmarks/serving.py passes the gateway's create_app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# (manager, api_key) -> the gateway's ASGI app
AppFactory = Callable[[Any, "str | None"], Any]

# Short common words: most are one token with a leading space in BPE vocabularies, so a prompt
# of n words is close to n tokens (the usage chunk reports the exact count).
_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no what "
    "up out them who more some time can other into only its new two may first then any these "
    "now could people over such our man me even most made after also did many well way down "
    "should because each just those how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last"
)
_WORDS = _TEXT.split()


def synthetic_prompt(rng: random.Random, num_tokens: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, num_tokens)))


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'64-256' or '128' -> (lo, hi), both >= 1."""
    lo_s, sep, hi_s = text.partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} = {text!r} is not N or A-B") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"{name} = {text!r}: need 1 <= A <= B")
    return lo, hi


@dataclass
class RequestResult:
    ok: bool = False
    status: int | None = None  # HTTP status, None when the connection failed
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between text chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    expected_tokens: int = 0


def completion_payload(model: str | None, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,  # fixed output lengths: the figures do not depend on the text
        "temperature": 0.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    return body


async def stream_completion(client: httpx.AsyncClient, body: dict) -> RequestResult:
    """One streaming request; never raises (failures are in the result)."""
    res = RequestResult(expected_tokens=body["max_tokens"])
    t0 = time.perf_counter()
    last = None
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = json.dumps(chunk["error"])[:300]
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.completion_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", ())):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.gaps_s.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e_s = time.perf_counter() - t0
    if not done:
        res.error = "the stream ended without data: [DONE]"
    elif res.completion_tokens == 0 or res.ttft_s is None:
        res.error = "no usage chunk or no text in the stream"
    else:
        res.ok = True
    return res


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms_stats(values: list[float]) -> dict[str, float | None]:
    def ms(v):
        return None if v is None else round(v * 1000, 2)

    mean = sum(values) / len(values) if values else None
    return {
        "mean_ms": ms(mean),
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "count": len(values),
    }


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = str(r.status) if r.status not in (None, 200) else "stream" if r.status else "conn"
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "errors_by_status": errors,
        "error_samples": [r.error for r in results if not r.ok][:5],
        "duration_s": round(duration_s, 3),
        "request_throughput_rps": round(len(ok) / duration_s, 4) if duration_s > 0 else None,
        "output_tokens": out_tokens,
        "output_tok_s": round(out_tokens / duration_s, 2) if duration_s > 0 else None,
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "short_outputs": sum(1 for r in ok if r.completion_tokens != r.expected_tokens),
        "ttft": _ms_stats([r.ttft_s for r in ok]),
        "tbt": _ms_stats([g for r in ok for g in r.gaps_s]),
        "e2e": _ms_stats([r.e2e_s for r in ok]),
    }


async def server_context(client: httpx.AsyncClient) -> dict[str, Any]:
    """What was measured: /v1/models, /health and, from an engine-only server, /v1/engine/info."""
    ctx: dict[str, Any] = {}
    for key, path in (
        ("models", "/v1/models"),
        ("health", "/health"),
        ("engine", "/v1/engine/info"),
    ):
        try:
            r = await client.get(path, timeout=10)
            ctx[key] = r.json() if r.status_code == 200 else {"status": r.status_code}
        except (httpx.HTTPError, ValueError) as e:
            ctx[key] = {"error": f"{type(e).__name__}: {e}"}
    return ctx


def machine_context() -> dict[str, Any]:
    return {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def make_client(url: str, api_key: str | None, timeout_s: float = 600) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Unbounded pool: an open-loop generator must never queue on its own connections.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits)


async def run_benchmark(
    url: str,
    *,
    rate: float,
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int = 0,
    model: str | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    plan = []
    t = 0.0
    for i in range(num_requests):
        if math.isfinite(rate) and i:
            t += rng.expovariate(rate)
        body = completion_payload(
            model,
            synthetic_prompt(rng, rng.randint(*input_len)),
            rng.randint(*output_len),
            seed + i,
        )
        plan.append((t, body))
    async with make_client(url, api_key) as client:
        ctx = await server_context(client)
        if model is None and ctx.get("models", {}).get("data"):
            model = ctx["models"]["data"][0]["id"]
            for _, body in plan:
                body["model"] = model
        load_before = machine_context()
        start = time.perf_counter()

        async def fire(at: float, body: dict) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            return await stream_completion(client, body)

        results = await asyncio.gather(*(fire(at, body) for at, body in plan))
        duration = time.perf_counter() - start
    return {
        "benchmark": "serving",
        "config": {
            "url": url,
            "model": model,
            "rate_rps": "inf" if math.isinf(rate) else rate,
            "num_requests": num_requests,
            "input_len": list(input_len),
            "output_len": list(output_len),
            "seed": seed,
        },
        "results": summarize(results, duration),
        "server": ctx,
        "machine": {**load_before, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "per_request": [
            {k: v for k, v in asdict(r).items() if k != "gaps_s"} | {"chunks": len(r.gaps_s) + 1}
            for r in results
        ],
    }


def format_table(report: dict[str, Any], server_label: str) -> str:
    c, r, m = report["config"], report["results"], report["machine"]

    def row(name, s):
        return f"  {name:<6} {s['mean_ms']!s:>10} {s['p50_ms']!s:>10} {s['p99_ms']!s:>10}"

    lines = [
        f"server:   {server_label} (model {c['model']})",
        f"load:     rate {c['rate_rps']} req/s, {c['num_requests']} requests, input "
        f"{c['input_len'][0]}-{c['input_len'][1]} (mean {r['prompt_tokens_mean']} tokens), "
        f"output {c['output_len'][0]}-{c['output_len'][1]}",
        f"machine:  {m['cpu_count']} CPUs, load average {m['load_average'][0]} -> "
        f"{m['load_average_end'][0]}, {m['time']}",
        f"  {'(ms)':<6} {'mean':>10} {'p50':>10} {'p99':>10}",
        row("TTFT", r["ttft"]),
        row("TBT", r["tbt"]),
        row("E2E", r["e2e"]),
        f"completed {r['completed']}, errors {r['errors']} {r['errors_by_status'] or ''}".rstrip(),
        f"throughput {r['request_throughput_rps']} req/s, {r['output_tok_s']} output tok/s "
        f"over {r['duration_s']} s",
    ]
    return "\n".join(lines)


class _ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        what = f" ({type(exc).__name__}: {exc})" if exc else ""
        self.messages.append(f"{record.name}: {record.getMessage()}{what}"[:500])


class SpawnedServer:
    """uvicorn in a daemon thread of this process, on a socket bound here (port 0: no race for
    a free port). The load generator shares the interpreter with it, so the figures include
    some GIL contention; `--url` against `sage-llm serve` measures the server alone."""

    def __init__(self, manager, app):
        import uvicorn

        self.manager = manager
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self._errors = _ErrorLog()

    @property
    def logged_errors(self) -> list[str]:
        """ERROR records the server logged since it started (exceptions in request handlers)."""
        return list(self._errors.messages)

    def start(self, timeout_s: float = 300.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the in-process server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the in-process server did not start within {timeout_s} s")
            time.sleep(0.05)
        # After start: uvicorn's logging config replaces the handlers of its own loggers.
        # ("uvicorn.error" propagates to "uvicorn", which does not propagate to the root.)
        for name in ("uvicorn", ""):
            logging.getLogger(name).addHandler(self._errors)

    def stop(self) -> None:
        for name in ("uvicorn", ""):
            logging.getLogger(name).removeHandler(self._errors)
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

    def engine(self):
        return self.manager.engines()[0]

    def description(self) -> dict[str, Any]:
        h = self.engine()
        return {"url": self.url, "engine_id": h.engine_id, "model": h.model, "pid": os.getpid()}


@contextlib.contextmanager
def spawned_server(
    model: Any, app_factory: AppFactory | None, *, api_key: str | None = None
) -> Iterator[SpawnedServer]:
    """A server over one LocalEngine. `model`: a path / HF id, "default", or an EngineConfig."""
    from sagellm.control_plane import ControlPlaneManager
    from sagellm.control_plane.config import EngineConfig

    if app_factory is None:
        raise SystemExit(
            "--spawn-model needs the gateway app: run benchmarks/*.py or `sage-llm bench`"
        )
    if not isinstance(model, EngineConfig):
        model = EngineConfig(model=None if model == "default" else model)
    manager = ControlPlaneManager(engine_configs=[model])
    srv = SpawnedServer(manager, app_factory(manager, api_key))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--spawn-model",
        metavar="M",
        help="start a server in this process for model M ('default' = the default model)",
    )
    p.add_argument("--rate", type=float, default=1.0, help="requests/s, Poisson; inf = all at once")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", default="64-256", help="prompt tokens, A-B (uniform) or N")
    p.add_argument("--output-len", default="32-128", help="generated tokens, A-B or N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model name to send (default: the first served)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--output", default=None, help="write the JSON report here")


def run(args: argparse.Namespace, app_factory: AppFactory | None = None) -> int:
    # `sage-llm bench` (the cli layer, which may import the gateway) sets args.app_factory.
    app_factory = app_factory or getattr(args, "app_factory", None)
    if args.rate <= 0 or math.isnan(args.rate):
        raise SystemExit(f"--rate = {args.rate} must be > 0 (or inf)")
    if args.num_requests < 1:
        raise SystemExit(f"--num-requests = {args.num_requests} must be >= 1")
    try:
        input_len = parse_range(args.input_len, "--input-len")
        output_len = parse_range(args.output_len, "--output-len")
    except argparse.ArgumentTypeError as e:
        raise SystemExit(str(e)) from None
    kw = dict(
        rate=args.rate,
        num_requests=args.num_requests,
        input_len=input_len,
        output_len=output_len,
        seed=args.seed,
        model=args.model,
        api_key=args.api_key,
    )
    if args.spawn_model:
        with spawned_server(args.spawn_model, app_factory, api_key=args.api_key) as srv:
            report = asyncio.run(run_benchmark(srv.url, **kw))
            label = f"in-process server for {args.spawn_model!r} at {srv.url} (spawned)"
            report["server"]["spawned"] = srv.description()
    else:
        report = asyncio.run(run_benchmark(args.url, **kw))
        label = f"{args.url} (external)"
    report["server"]["label"] = label
    print(format_table(report, label))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.output}")
    return 0 if report["results"]["errors"] == 0 else 1


def main(argv: list[str] | None = None, app_factory: AppFactory | None = None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv), app_factory)
