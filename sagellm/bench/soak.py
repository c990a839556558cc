"""Soak test: M concurrent streaming clients against a server for D seconds, a share of their
requests cancelled mid-stream and a share deliberately bad, then checks that nothing leaked.

It fails (exit code 1) on: lost requests (started, but neither completed, cancelled by us nor
answered with an error: hung past the request timeout, or a stream cut without [DONE]);
unexpected errors (5xx, connection failures, malformed or traceback-bearing bodies, a bad request
not answered 4xx with an OpenAI error object); KV blocks still held or requests still in the
engine after a short settle; and a run that completed nothing. Resident memory growth after the
warm-up is reported (and fails only past --max-rss-growth-mb).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from typing import Any

import httpx

from sagellm.bench.serving import (
    AppFactory,
    completion_payload,
    machine_context,
    make_client,
    server_context,
    spawned_server,
    synthetic_prompt,
)

_LEAKY = re.compile(r"Traceback|File \"|site-packages|/sagellm/|\.py\b")
BAD_KINDS = ("malformed_json", "wrong_type", "out_of_range", "unknown_model", "overlong_prompt")
_CONFIG_KEYS = [
    "clients",
    "duration_s",
    "cancel_share",
    "bad_share",
    "input_len",
    "output_len",
    "seed",
    "warmup_s",
    "settle_s",
    "sample_s",
    "request_timeout_s",
    "max_rss_growth_mb",
    "server_pid",
    "spawn_model",
]
_OUT_OF_RANGE = ({"max_tokens": -3}, {"temperature": -1.0}, {"top_p": 1.5}, {"n": 0})


def rss_mb(pid: int | None = None) -> float | None:
    """VmRSS of a process (this one by default) in MiB; None where /proc is not readable."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_error_body(status: int, text: str) -> str | None:
    """Why a refusal is not a proper OpenAI error (None when it is)."""
    if not 400 <= status < 500:
        return f"status {status}, expected 4xx"
    if _LEAKY.search(text):
        return "the error body shows a traceback or a source path"
    try:
        err = json.loads(text)["error"]
        if not (isinstance(err["message"], str) and err["message"] and "type" in err):
            return "the error object lacks message/type"
        err["code"]
    except (ValueError, KeyError, TypeError):
        return "the body is not an OpenAI error object"
    return None


class Soak:
    def __init__(self, client: httpx.AsyncClient, model: str, args, max_model_len: int | None):
        self.client, self.model, self.args = client, model, args
        self.max_model_len = max_model_len or 32768
        self.outcomes: Counter[str] = Counter()
        self.bad_statuses: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.samples: list[str] = []

    def _unexpected(self, kind: str, detail: str) -> str:
        self.unexpected[kind] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{kind}: {detail[:300]}")
        return "unexpected"

    async def normal(self, rng: random.Random, cancel_after: int | None) -> str:
        max_tokens = rng.randint(*self.args.output_len)
        body = completion_payload(
            self.model, synthetic_prompt(rng, rng.randint(*self.args.input_len)), max_tokens, 0
        )
        body["seed"] = rng.randrange(2**31)
        chunks, usage, done = 0, None, False
        async with self.client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return self._unexpected(f"http_{r.status_code}", text)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(line[6:])
                except ValueError:
                    return self._unexpected("bad_chunk", line)
                if "error" in chunk:
                    return self._unexpected("stream_error", json.dumps(chunk["error"]))
                usage = chunk.get("usage") or usage
                if any(c.get("text") for c in chunk.get("choices", ())):
                    chunks += 1
                    if cancel_after is not None and chunks >= cancel_after:
                        return "cancelled"  # leaving the block closes the connection mid-stream
        if not done:
            return "lost"
        if cancel_after is not None:
            return "completed"  # finished before the cancel point: a short output
        if usage is None or usage.get("completion_tokens") != max_tokens:
            return self._unexpected("bad_usage", f"usage {usage}, max_tokens {max_tokens}")
        return "completed"

    async def bad(self, rng: random.Random) -> str:
        kind = rng.choice(BAD_KINDS)
        body: Any = {"model": self.model, "prompt": "hello", "max_tokens": 4}
        if kind == "malformed_json":
            content = json.dumps(body)[: rng.randint(1, 20)].encode()
        else:
            if kind == "wrong_type":
                body["max_tokens"] = "many"
            elif kind == "out_of_range":
                body.update(rng.choice(_OUT_OF_RANGE))
            elif kind == "unknown_model":
                body["model"] = "no-such-model-" + str(rng.randrange(1000))
            else:  # each word is at least one token
                body["prompt"] = synthetic_prompt(rng, self.max_model_len + 64)
            content = json.dumps(body).encode()
        r = await self.client.post(
            "/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        self.bad_statuses[f"{kind}:{r.status_code}"] += 1
        why = check_error_body(r.status_code, r.text)
        return self._unexpected(f"bad_{kind}", f"{why}: {r.text}") if why else "rejected"

    async def one(self, rng: random.Random) -> str:
        roll = rng.random()
        a = self.args
        try:
            if roll < a.bad_share:
                coro = self.bad(rng)
            else:
                cancel = rng.randint(1, 4) if roll < a.bad_share + a.cancel_share else None
                coro = self.normal(rng, cancel)
            return await asyncio.wait_for(coro, a.request_timeout_s)
        except TimeoutError:
            return "lost"  # hung: no answer within the request timeout
        except httpx.HTTPError as e:
            return self._unexpected("connection", f"{type(e).__name__}: {e}")

    async def client_loop(self, cid: int, end: float) -> None:
        rng = random.Random(self.args.seed * 7919 + cid)
        while time.monotonic() < end:
            self.outcomes[await self.one(rng)] += 1


class EngineProbe:
    """Engine counters: read in process for a spawned server, else over HTTP."""

    def __init__(self, client: httpx.AsyncClient, engine=None, server_pid: int | None = None):
        self.client, self.engine, self.server_pid = client, engine, server_pid

    def rss(self) -> float | None:
        if self.engine is not None:
            return rss_mb()
        return rss_mb(self.server_pid) if self.server_pid else None

    async def read(self) -> dict[str, Any]:
        if self.engine is not None:
            s, load = self.engine.stats(), self.engine.load()
            return {
                "kv_blocks_used": s.get("kv_blocks_used"),
                "kv_blocks_cached": s.get("kv_blocks_cached"),
                "kv_usage": s.get("kv_usage"),
                "in_flight": load.in_flight + load.running + load.waiting,
            }
        r = await self.client.get("/v1/engine/load", timeout=10)
        if r.status_code == 200:
            load = r.json()
            busy = load["in_flight"] + load["running"] + load["waiting"]
            return {"kv_usage": load["kv_usage"], "in_flight": busy}
        text = await self.metrics_text()
        return {
            "kv_usage": metric_sum(text, "sagellm_kv_cache_usage_ratio"),
            "in_flight": metric_sum(text, "sagellm_engine_running")
            + metric_sum(text, "sagellm_engine_waiting"),
        }

    async def metrics_text(self) -> str:
        return (await self.client.get("/metrics", timeout=10)).text

    async def read_all(self) -> dict[str, Any]:
        """Engine counters plus the gateway's admission slots still taken (from /metrics)."""
        state = await self.read()
        running = metric_sum(await self.metrics_text(), "sagellm_requests_running")
        return {**state, "gateway_running": int(running)}


def metric_sum(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples over all its labels (0 when absent)."""
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


def _held(state: dict[str, Any]) -> bool:
    kv = state.get("kv_blocks_used")
    busy = state["in_flight"] or state.get("gateway_running")
    return bool(busy or (kv if kv is not None else state["kv_usage"]))


async def soak(
    url: str, args, engine=None, server_pid: int | None = None, logged_errors=None
) -> dict[str, Any]:
    """`logged_errors()`: the ERROR records of an in-process server so far (None: unknown)."""
    async with make_client(url, args.api_key) as client:
        ctx = await server_context(client)
        model = args.model or ctx["models"]["data"][0]["id"]
        info = engine.info() if engine is not None else ctx.get("engine", {})
        probe = EngineProbe(client, engine, server_pid)
        s = Soak(client, model, args, info.get("max_model_len"))
        machine = machine_context()
        t0 = time.monotonic()
        end = t0 + args.duration_s
        tasks = [asyncio.create_task(s.client_loop(i, end)) for i in range(args.clients)]
        timeline, rss_start = [], None
        warm_at = t0 + args.warmup_s
        while not all(t.done() for t in tasks):
            wait = args.sample_s
            if rss_start is None:  # wake at the end of the warm-up for the RSS baseline
                wait = min(wait, max(0.01, warm_at - time.monotonic()))
            await asyncio.wait(tasks, timeout=wait)
            now = time.monotonic()
            if rss_start is None and now >= warm_at:
                rss_start = probe.rss()
            timeline.append(
                {"t_s": round(now - t0, 1), "rss_mb": probe.rss(), **await probe.read()}
            )
        await asyncio.gather(*tasks)
        settle_end = time.monotonic() + args.settle_s
        state = await probe.read_all()
        while _held(state) and time.monotonic() < settle_end:
            await asyncio.sleep(0.2)
            state = await probe.read_all()
        rss_end = probe.rss()
    growth = None if rss_start is None or rss_end is None else round(rss_end - rss_start, 1)
    # With prefix caching, freed blocks stay cached and new ones come from never-used memory, so
    # RSS grows as the (lazily committed) KV pool is first touched: report both side by side.
    touched = [
        e["kv_blocks_used"] + e["kv_blocks_cached"]
        for e in [*timeline, state]
        if e.get("kv_blocks_cached") is not None
    ]
    kv_left = state.get("kv_blocks_used")
    failures = []
    if s.outcomes["lost"]:
        failures.append(f"{s.outcomes['lost']} requests lost")
    if sum(s.unexpected.values()):
        failures.append(f"{sum(s.unexpected.values())} unexpected errors {dict(s.unexpected)}")
    if kv_left or (kv_left is None and state["kv_usage"]):
        failures.append(f"KV still held after {args.settle_s} s: {state}")
    if state["in_flight"]:
        failures.append(f"{state['in_flight']} requests still in the engine after the settle")
    if state["gateway_running"]:
        failures.append(f"{state['gateway_running']} gateway admission slots still taken")
    server_errors = logged_errors() if logged_errors is not None else None
    if server_errors and not args.allow_server_errors:
        failures.append(f"the server logged {len(server_errors)} errors")
    if not s.outcomes["completed"]:
        failures.append("no request completed")
    if (
        args.max_rss_growth_mb is not None
        and growth is not None
        and growth > args.max_rss_growth_mb
    ):
        failures.append(f"RSS grew {growth} MiB > {args.max_rss_growth_mb}")
    return {
        "benchmark": "soak",
        "config": {k: v for k, v in vars(args).items() if k in _CONFIG_KEYS}
        | {"model": model, "url": url},
        "outcomes": dict(s.outcomes),
        "requests": sum(s.outcomes.values()),
        "lost": s.outcomes["lost"],
        "unexpected_errors": dict(s.unexpected),
        "unexpected_samples": s.samples,
        "bad_requests_by_kind_status": dict(s.bad_statuses),
        "server_errors_logged": None if server_errors is None else len(server_errors),
        "server_error_samples": (server_errors or [])[:10],
        "end_state": state,
        "kv_blocks_held_at_end": kv_left,
        "rss_mb": {
            "what": "this process (server + clients)" if engine is not None else "server pid",
            "after_warmup": rss_start,
            "end": rss_end,
            "growth": growth,
            "kv_blocks_touched_max": max(touched) if touched else None,
        },
        "timeline": timeline,
        "server": ctx,
        "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "passed": not failures,
        "failures": failures,
    }


def format_table(rep: dict[str, Any], label: str) -> str:
    c, rss, m = rep["config"], rep["rss_mb"], rep["machine"]
    o = rep["outcomes"]
    lines = [
        f"server:     {label} (model {c['model']})",
        f"load:       {c['clients']} clients for {c['duration_s']} s, cancel {c['cancel_share']}, "
        f"bad {c['bad_share']}; load average {m['load_average'][0]} -> {m['load_average_end'][0]}",
        f"requests:   {rep['requests']} = completed {o.get('completed', 0)}, cancelled "
        f"{o.get('cancelled', 0)}, rejected (bad, 4xx) {o.get('rejected', 0)}, unexpected "
        f"{o.get('unexpected', 0)}, lost {o.get('lost', 0)}",
        f"bad:        {rep['bad_requests_by_kind_status']}",
        f"unexpected: {rep['unexpected_errors'] or 'none'}; server errors logged: "
        f"{rep['server_errors_logged']}",
        f"end state:  KV blocks held {rep['kv_blocks_held_at_end']}, {rep['end_state']}",
        f"RSS (MiB):  {rss['what']}: {rss['after_warmup']} after warm-up -> {rss['end']} "
        f"(growth {rss['growth']}; KV blocks used + cached peaked at "
        f"{rss['kv_blocks_touched_max']})",
        "PASS" if rep["passed"] else "FAIL: " + "; ".join(rep["failures"]),
    ]
    return "\n".join(lines)


def _share(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share in [0, 1]")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sagellm.bench.serving import parse_range

    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--spawn-model", metavar="M", help="serve model M in this process ('default' = default)"
    )
    p.add_argument("--clients", type=int, default=6, help="concurrent streaming clients")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--cancel-share", type=_share, default=0.2, help="requests closed mid-stream")
    p.add_argument("--bad-share", type=_share, default=0.1, help="deliberately bad requests")
    p.add_argument("--input-len", type=lambda t: parse_range(t, "--input-len"), default="16-128")
    p.add_argument("--output-len", type=lambda t: parse_range(t, "--output-len"), default="8-64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model name to send (default: the first served)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--server-pid", type=int, default=None, help="with --url: RSS from /proc/PID")
    p.add_argument("--warmup-s", type=float, default=None, help="RSS baseline after this (D/10)")
    p.add_argument("--settle-s", type=float, default=5.0, help="wait for blocks to be freed")
    p.add_argument("--sample-s", type=float, default=10.0, help="timeline sampling period")
    p.add_argument("--request-timeout-s", type=float, default=180.0, help="longer = lost")
    p.add_argument("--max-rss-growth-mb", type=float, default=None, help="fail past this growth")
    p.add_argument(
        "--allow-server-errors",
        action="store_true",
        help="with --spawn-model: report, but do not fail on, errors the server logs",
    )
    p.add_argument("--output", default=None, help="write the JSON report here")


def run(args: argparse.Namespace, app_factory: AppFactory | None = None) -> int:
    # `sage-llm bench` (the cli layer, which may import the gateway) sets args.app_factory.
    app_factory = app_factory or getattr(args, "app_factory", None)
    if args.clients < 1 or args.duration_s <= 0:
        raise SystemExit(f"--clients = {args.clients} and --duration-s = {args.duration_s} > 0")
    if args.cancel_share + args.bad_share > 1:
        raise SystemExit("--cancel-share + --bad-share must be at most 1")
    if args.warmup_s is None:
        args.warmup_s = min(60.0, args.duration_s / 10)
    if args.spawn_model:
        with spawned_server(args.spawn_model, app_factory, api_key=args.api_key) as srv:
            label = f"in-process server for {args.spawn_model!r} at {srv.url} (spawned)"
            rep = asyncio.run(
                soak(srv.url, args, engine=srv.engine(), logged_errors=lambda: srv.logged_errors)
            )
    else:
        label = f"{args.url} (external)"
        rep = asyncio.run(soak(args.url, args, server_pid=args.server_pid))
    rep["server"]["label"] = label
    print(format_table(rep, label))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rep, f, indent=2)
        print(f"wrote {args.output}")
    return 0 if rep["passed"] else 1


def main(argv: list[str] | None = None, app_factory: AppFactory | None = None, prog=None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv), app_factory)
