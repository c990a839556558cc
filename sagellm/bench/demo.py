"""`sage-llm demo`: run the WORKLOADS.md workloads through a ControlPlaneManager in this process
or against a running server's OpenAI streaming API, time every streamed token, and write the
aggregated Protocol v0.1 metrics (demo_report.py) with the run's context.

    report = asyncio.run(run_demo(select("year1"), model=None, url=None, scale=1.0))
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable

from sagellm.bench.demo_report import RequestResult, WorkloadRun, aggregate, check_contract
from sagellm.bench.workloads import PromptFactory, Segment, Workload


def _token_timing(result: RequestResult, t0: float, times: list[float], end: float) -> None:
    """Client-side TTFT / TBT / TPOT / e2e from the arrival time of each streamed token."""
    result.e2e_s = end - t0
    if times:
        result.ttft_ms = (times[0] - t0) * 1e3
    if len(times) > 1:
        gaps = [b - a for a, b in zip(times, times[1:])]
        result.tbt_ms = sum(gaps) / len(gaps) * 1e3
        result.tpot_ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3


class InProcessTarget:
    """One native engine behind a ControlPlaneManager in this process."""

    mode = "in-process"

    def __init__(self, engine_config, backend_config=None):
        from sagellm.control_plane import BackendConfig, ControlPlaneManager

        self.manager = ControlPlaneManager(
            backend_config=backend_config or BackendConfig(), engine_configs=[engine_config]
        )
        self.model_name = engine_config.served_name()

    async def start(self) -> None:
        await self.manager.start()
        self.model_name = self.manager.models()[0]
        tok = self.manager.tokenizer_for(self.model_name)
        self.encode = lambda text: tok.encode(text, add_special_tokens=False)

    async def stop(self) -> None:
        await self.manager.stop()

    def context(self) -> dict:
        handle = self.manager.engines()[0]
        info = handle.info()
        return {"engine": info, "kernels": kernel_names(handle, info)}

    async def one(self, seg: str, prompt: list[int], max_tokens: int, budget: int | None):
        from sagellm.protocol import ProtocolError, Request, StreamDelta, StreamEnd

        request = Request(
            model=self.model_name,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=True,
            ignore_eos=True,
            kv_budget_tokens=budget,
        )
        result = RequestResult(seg, ok=False, prompt_tokens=len(prompt))
        times: list[float] = []
        t0 = time.perf_counter()
        try:
            async for ev in self.manager.stream_request(request):
                now = time.perf_counter()
                if isinstance(ev, StreamDelta):
                    times.extend([now] * len(ev.chunk_tokens))
                elif isinstance(ev, StreamEnd):
                    result.output_tokens = len(ev.output_tokens)
                    result.server = ev.metrics.model_dump()
                    result.ok = ev.finish_reason in ("stop", "length")
                    if not result.ok:
                        result.error = ev.error.message if ev.error else ev.finish_reason
        except ProtocolError as e:
            result.error = f"{e.code.value}: {e}"
        _token_timing(result, t0, times, time.perf_counter())
        return result


class URLTarget:
    """A running `sage-llm serve` / gateway, through POST /v1/completions with stream=true.

    Prompts go as token ids, so their lengths are exact; `encode` is the tokenizer of --model
    (the served model's, for the lengths to mean tokens of that model)."""

    mode = "url"

    def __init__(self, url: str, encode: Callable[[str], list[int]], api_key: str | None = None):
        self.url = url.rstrip("/")
        self.encode = encode
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model_name = None

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=httpx.Timeout(600, connect=10)
        )
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        self.model_name = r.json()["data"][0]["id"]

    async def stop(self) -> None:
        await self.client.aclose()

    def context(self) -> dict:
        return {"url": self.url}

    async def server_info(self) -> dict | None:
        try:  # only engine-only servers have it
            r = await self.client.get("/v1/engine/info")
            return r.json() if r.status_code == 200 else None
        except Exception:
            return None

    async def one(self, seg: str, prompt: list[int], max_tokens: int, budget: int | None):
        body = {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        result = RequestResult(seg, ok=False, prompt_tokens=len(prompt))
        times: list[float] = []
        t0 = time.perf_counter()
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    raise RuntimeError(f"HTTP {r.status_code}: {text[:200]}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"].get("message", str(chunk["error"])))
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            times.append(now)
                        if choice.get("finish_reason") == "error":
                            raise RuntimeError("the stream ended with an error")
                    if chunk.get("usage"):
                        result.output_tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("metrics"):
                        result.server = chunk["metrics"]
            result.ok = True
        except Exception as e:  # a failed request is a data point, not the end of the demo
            result.error = f"{type(e).__name__}: {e}"
        _token_timing(result, t0, times, time.perf_counter())
        if result.ok and result.output_tokens > len(times) > 1:
            # A chunk can carry several tokens (text held back until it forms whole characters);
            # TPOT is per token, so it uses the token count the server reported.
            result.tpot_ms = (times[-1] - times[0]) / (result.output_tokens - 1) * 1e3
        return result


def load_tokenizer(model: str | None):
    """The tokenizer of `model` (None: the default model) without loading its weights."""
    from sagellm.models.resolve import resolve_model
    from sagellm.models.tokenizer import Tokenizer

    if model is None:
        from sagellm.models.default_model import default_model_path

        kind, path = "gguf", default_model_path()
    else:
        resolved = resolve_model(model)
        kind, path = resolved.kind, resolved.path
    if kind == "gguf":
        from sagellm.models.gguf_loader import GGUFFile, gguf_config_dict

        return Tokenizer.from_gguf(path, gguf_config_dict(GGUFFile(path))["model_type"])
    tok = Tokenizer.from_folder(path)
    if tok is None:
        raise ValueError(f"model = {model!r} ships no tokenizer files; pass another --model")
    return tok


def kernel_names(handle, info: dict) -> dict:
    """Which kernels run attention and the linear layers of this engine."""
    device = info.get("device", "?")
    isa = (info.get("kernels") or {}).get("cpu_isa")
    where = f"cpu/{isa}" if device == "cpu" and isa else device
    out = {"attention": f"sagellm.paged_attention_decode + paged_attention_prefill ({where})"}
    engine = getattr(handle, "_engine", None)  # LocalEngine's LLMEngine, when in this process
    model = getattr(engine, "model", None)
    if model is not None:
        methods = sorted(
            {
                m.method.name
                for m in model.modules()
                if hasattr(m, "method") and hasattr(m.method, "name")
            }
        )
        gemm = "oneDNN/MKL" if device == "cpu" else "cuBLAS"
        out["linear"] = f"{'+'.join(methods)} weights, torch.nn.functional.linear ({gemm} GEMM)"
    return out


def hardware() -> dict:
    import torch

    from sagellm import ops
    from sagellm.backends.cpu import cpu_model

    hw = {
        "cpu_model": cpu_model(),
        "cpu_isa": ops.cpu_isa(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import sagellm
    from sagellm.protocol import PROTOCOL_VERSION

    out = {"sagellm": sagellm.__version__, "protocol": PROTOCOL_VERSION}
    out["python"] = sys.version.split()[0]
    for pkg in ("torch", "transformers", "tokenizers", "fastapi", "uvicorn"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


async def _segment(target, workload: Workload, seg: Segment, factory: PromptFactory):
    prompts = factory.segment_prompts(workload.name, seg)
    budget = workload.kv_budget_tokens

    def call(p):
        return target.one(seg.name, p, seg.output_tokens, budget)

    if seg.concurrent:
        return list(await asyncio.gather(*(call(p) for p in prompts)))
    return [await call(p) for p in prompts]


async def run_workloads(target, workloads: list[Workload], scale: float, log=print) -> dict:
    """Run each workload (scaled) against a started target; the report without the context."""
    factory = PromptFactory(target.encode)
    # One short request first, so start-up costs (first-call allocations, thread pools) do not
    # land in the first measured TTFT.
    await target.one("warmup", factory.text_tokens(8, random.Random(0)), 4, None)
    out: dict = {}
    for wl in workloads:
        wl = wl.scaled(scale)
        run = WorkloadRun()
        t0 = time.perf_counter()
        seg_metrics = {}
        for seg in wl.segments:
            log(
                f"  {wl.name}/{seg.name}: {seg.requests} x ({seg.prompt_tokens} -> "
                f"{seg.output_tokens} tokens){' at once' if seg.concurrent else ''}"
            )
            s0 = time.perf_counter()
            results = await _segment(target, wl, seg, factory)
            seg_metrics[seg.name] = aggregate(results, time.perf_counter() - s0)
            run.results += results
        run.total_time_s = time.perf_counter() - t0
        metrics = aggregate(run.results, run.total_time_s)
        entry = {"workload": wl.to_dict(), "metrics": metrics, "segments": seg_metrics}
        if wl.contract is not None:
            entry["contract"] = check_contract(wl.contract, metrics)
        errors = [f"{r.segment}: {r.error}" for r in run.results if r.error][:10]
        if errors:
            entry["errors"] = errors
        out[wl.name] = (entry, run)
    return out


def build_report(target, results: dict, scale: float, context: dict, argv: list[str]) -> dict:
    all_results = [r for _, run in results.values() for r in run.results]
    total = sum(run.total_time_s for _, run in results.values())
    return {
        "protocol_version": context["versions"]["protocol"],
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": argv,
        "scale": scale,
        "context": context,
        "workloads": {name: entry for name, (entry, _) in results.items()},
        "summary": aggregate(all_results, total),
    }


def base_context(target, model: str | None, dtype: str) -> dict:
    return {
        "mode": target.mode,
        "model": model or "default (SmolLM2-135M-Instruct)",
        "model_name": target.model_name,
        "dtype": dtype,
        "hardware": hardware(),
        "versions": versions(),
        "platform": platform.platform(),
    }
