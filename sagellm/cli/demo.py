"""`sage-llm demo --workload year1 --output metrics.json`: the WORKLOADS.md workloads, in process
(one native engine behind the control plane) or against a running server (`--url`), with their
aggregated Protocol v0.1 metrics written to JSON and checked against the year contracts."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument(
        "--workload",
        default="year1",
        help="year1, year2, year3, q1..q8, all, or a comma list (default year1)",
    )
    p.add_argument(
        "-o", "--output", default="metrics.json", help="JSON file, or a folder (metrics.json in it)"
    )
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write a Markdown report")
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="model to run (in process), or whose "
        "tokenizer builds the prompts (--url); default SmolLM2-135M-Instruct",
    )
    p.add_argument("--url", default=None, help="a running server (sage-llm serve / gateway)")
    p.add_argument("--api-key", default=None, help="Bearer key for --url")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply prompt/output lengths and request counts (e.g. 0.25 for a quick CPU run)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", help="in process: auto, cpu, cuda, ... (auto)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    p.set_defaults(func=run)


def _output_path(output: str) -> Path:
    path = Path(output)
    return path / "metrics.json" if path.is_dir() or output.endswith(("/", "\\")) else path


def _tokenizer_encode(model: str | None):
    """encode(text) of `model`'s tokenizer, loading the tokenizer only (not the weights)."""
    from sagellm.bench.demo import load_tokenizer

    tok = load_tokenizer(model)
    return lambda text: tok.encode(text, add_special_tokens=False)


async def _main(args, workloads, log) -> dict:
    from sagellm.bench import demo

    if args.url:
        target = demo.URLTarget(args.url, _tokenizer_encode(args.model), args.api_key)
    else:
        from sagellm.control_plane import BackendConfig, EngineConfig

        engine = EngineConfig(
            model=args.model,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            num_threads=args.num_threads,
        )
        target = demo.InProcessTarget(engine, BackendConfig(kind=args.backend))
    t0 = time.perf_counter()
    await target.start()
    log(
        f"sage-llm demo: {target.mode} target ready in {time.perf_counter() - t0:.1f} s "
        f"(model {target.model_name})"
    )
    try:
        results = await demo.run_workloads(target, workloads, args.scale, log)
        context = demo.base_context(target, args.model, args.dtype)
        context.update(target.context())
        if args.url:
            info = await target.server_info()
            if info:
                context["engine"] = info
        if "engine" in context and context["engine"].get("dtype"):
            context["dtype"] = context["engine"]["dtype"]
    finally:
        await target.stop()
    return demo.build_report(target, results, args.scale, context, sys.argv)


def run(args) -> int:
    from sagellm.bench.demo_report import render_markdown, render_table
    from sagellm.bench.workloads import select

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        if not 0 < args.scale <= 1:
            raise ValueError(f"--scale = {args.scale} is invalid: expected 0 < scale <= 1")
        workloads = select(args.workload)
        report = asyncio.run(_main(args, workloads, log))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line, never a traceback
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"sage-llm demo: error: {text}", file=sys.stderr)
        return 1
    out = _output_path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render_table(report))
    print(f"metrics written to {out}")
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render_markdown(report), encoding="utf-8")
        print(f"report written to {md}")
    failed = report["summary"]["failed_requests"]
    return 0 if failed == 0 else 3
