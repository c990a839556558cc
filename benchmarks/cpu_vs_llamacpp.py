"""sageLLM against llama.cpp on the CPU: the same GGUF file, the same thread count, one run.

    python benchmarks/cpu_vs_llamacpp.py                       # default model, 2 threads
    python benchmarks/cpu_vs_llamacpp.py --model gemma.gguf --output cpu_vs_llamacpp.json

Three figures per engine, each engine in its own subprocess (so its peak resident memory is its
own, read from /proc/self/status VmHWM at the end):
- batch-1 decode tok/s: a short prompt, then --decode-tokens greedy tokens; the time from the
  first generated token to the last, per token after the first (prefill excluded).
- prompt processing tok/s: a --prompt-tokens prompt, one token out; prompt tokens / time to the
  first token. Median of --pp-repeats distinct prompts (distinct so no prefix cache helps).
- --concurrent requests (prompts of 64-128 tokens, --concurrent-output tokens each): total output
  tok/s. sageLLM gets them all at once (continuous batching); llama.cpp's Python API and server
  answer one request at a time, so it runs them one after another in process (its server's best
  case: no HTTP).
Prompts are token ids from the model's tokenizer, identical for both engines; outputs are forced
to their length (EOS ignored). The table comes last; --output writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_MARK = "@@result "


# ---- the workload (built once by the parent, identical for both engines) --------------------------


def build_workload(args: argparse.Namespace, model: Path) -> dict:
    from sagellm.bench.workloads import PromptFactory
    from sagellm.models.gguf_loader import GGUFFile, gguf_config_dict
    from sagellm.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model, gguf_config_dict(GGUFFile(model))["model_type"])
    factory = PromptFactory(lambda s: tok.encode(s, add_special_tokens=False))
    rng = random.Random(f"cpu_vs_llamacpp/{args.seed}")
    return {
        "warmup": [factory.text_tokens(24, rng) for _ in range(2)],
        "decode_prompt": factory.text_tokens(args.decode_prompt_tokens, rng),
        "decode_tokens": args.decode_tokens,
        "pp_prompts": [
            factory.text_tokens(args.prompt_tokens, rng) for _ in range(args.pp_repeats)
        ],
        "concurrent_prompts": [
            factory.text_tokens(rng.randint(64, 128), rng) for _ in range(args.concurrent)
        ],
        "concurrent_output": args.concurrent_output,
    }


# ---- workers: one engine each, in its own process ------------------------------------------------


def _memory_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def run_sagellm(args: argparse.Namespace, work: dict) -> dict:
    from sagellm.runtime.config import EngineConfig
    from sagellm.runtime.engine import LLMEngine
    from sagellm.runtime.params import SamplingParams

    start = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            num_threads=args.threads,
            max_model_len=args.ctx,
            max_num_seqs=max(16, args.concurrent),
            load_progress=False,
        )
    )
    result = {
        "load_s": time.perf_counter() - start,
        "rss_after_load_kib": _memory_kib()["VmRSS"],
        "dtype": str(engine.dtype).removeprefix("torch."),
        "weights": _sagellm_weights(engine),
    }
    greedy = dict(temperature=0.0, ignore_eos=True)
    engine.generate(work["warmup"], SamplingParams(max_tokens=8, **greedy))

    # batch-1 decode: time each token as the engine emits it
    n = work["decode_tokens"]
    engine.add_request(work["decode_prompt"], SamplingParams(max_tokens=n, **greedy))
    clock = []
    while engine.has_unfinished():
        for out in engine.step():
            clock.extend([time.perf_counter()] * (len(out.token_ids) - len(clock)))
    result["decode_tok_s"] = (len(clock) - 1) / (clock[-1] - clock[0])

    pp = []
    for prompt in work["pp_prompts"]:
        t0 = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=1, **greedy))
        pp.append(len(prompt) / (time.perf_counter() - t0))
    result["pp_tok_s"] = statistics.median(pp)

    m = work["concurrent_output"]
    t0 = time.perf_counter()
    outs = engine.generate(work["concurrent_prompts"], SamplingParams(max_tokens=m, **greedy))
    wall = time.perf_counter() - t0
    produced = sum(len(o.token_ids) for o in outs)
    result["concurrent_tok_s"] = produced / wall
    result["concurrent_wall_s"] = wall
    return result


def _sagellm_weights(engine) -> dict:
    """Bytes of the model's weights in memory, and how many Linear parts run on each kernel."""
    from collections import Counter

    from gguf import GGMLQuantizationType

    from sagellm.models.layers.linear import GGUFWeights, Linear

    kernels: Counter = Counter()
    for m in engine.model.modules():
        if isinstance(m, Linear) and isinstance(m.method, GGUFWeights):
            for qtype, _ in m.method.describe():
                name = "dense" if qtype is None else GGMLQuantizationType(qtype).name
                kernels[f"{name}: gguf_linear" if qtype is not None else name] += 1
        elif isinstance(m, Linear):
            kernels[f"dense {str(engine.dtype).removeprefix('torch.')}"] += 1
    nbytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return {"bytes": nbytes, "linear_parts": dict(kernels)}


def run_llamacpp(args: argparse.Namespace, work: dict) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_ctx=args.ctx,
        n_batch=max(512, args.prompt_tokens),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    result = {
        "load_s": time.perf_counter() - start,
        "rss_after_load_kib": _memory_kib()["VmRSS"],
        "version": llama_cpp.__version__,
    }

    # The same loop as sagellm.bench.throughput_backends', written again on purpose: importing
    # that module loads torch into this process and would inflate llama.cpp's measured RSS.
    def generate(prompt: list[int], n: int, clock: list[float] | None = None) -> int:
        llm.reset()
        count = 0
        # generate() never stops by itself (EOS is the caller's business): ignore_eos for free.
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            count += 1
            if clock is not None:
                clock.append(time.perf_counter())
            if count >= n:
                break
        return count

    for prompt in work["warmup"]:
        generate(prompt, 8)

    clock: list[float] = []
    generate(work["decode_prompt"], work["decode_tokens"], clock)
    result["decode_tok_s"] = (len(clock) - 1) / (clock[-1] - clock[0])

    pp = []
    for prompt in work["pp_prompts"]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)  # the prompt's logits: what a first token needs
        pp.append(len(prompt) / (time.perf_counter() - t0))
    result["pp_tok_s"] = statistics.median(pp)

    m = work["concurrent_output"]
    t0 = time.perf_counter()
    produced = sum(generate(p, m) for p in work["concurrent_prompts"])
    wall = time.perf_counter() - t0
    result["concurrent_tok_s"] = produced / wall
    result["concurrent_wall_s"] = wall
    return result


WORKERS = {"sagellm": run_sagellm, "llamacpp": run_llamacpp}


def worker_main(args: argparse.Namespace) -> int:
    work = json.loads(Path(args.workload).read_text())
    result = WORKERS[args.worker](args, work)
    mem = _memory_kib()
    result["peak_rss_mib"] = mem["VmHWM"] / 1024
    result["rss_after_load_mib"] = result.pop("rss_after_load_kib") / 1024
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ---- the parent: run each engine, print the table ------------------------------------------------


def _load_average() -> float:
    return os.getloadavg()[0]


def run_engine(name: str, args: argparse.Namespace, workload_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--workload", workload_path]
    for key in ("model", "threads", "dtype", "ctx", "prompt_tokens", "concurrent"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    load_before = _load_average()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["load_average"] = [load_before, _load_average()]
    return result


def render(results: dict, args: argparse.Namespace) -> str:
    names = list(results)
    compare = "sagellm" in results and "llamacpp" in results
    rows = [
        ("batch-1 decode tok/s", "decode_tok_s", 1.0),
        (f"prompt processing tok/s ({args.prompt_tokens} tok)", "pp_tok_s", 1.0),
        (f"{args.concurrent} concurrent, output tok/s", "concurrent_tok_s", 3.0),
        ("peak RSS MiB", "peak_rss_mib", None),
        ("RSS after load MiB", "rss_after_load_mib", None),
        ("load s", "load_s", None),
    ]
    head = ["figure", *names] + (["sageLLM / llama.cpp", "target"] if compare else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, target in rows:
        cells = [label] + [f"{results[n][key]:.1f}" for n in names]
        if compare:
            ratio = results["sagellm"][key] / results["llamacpp"][key]
            met = "" if target is None else "met" if ratio >= target else "NOT met"
            cells += [f"{ratio:.2f}x", f">= {target:g}x {met}" if target else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="sageLLM --dtype (auto: GGUF weights native)")
    p.add_argument("--engines", default="sagellm,llamacpp")
    p.add_argument("--decode-prompt-tokens", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--pp-repeats", type=int, default=3)
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument("--concurrent-output", type=int, default=128)
    p.add_argument("--ctx", type=int, default=2048, help="context length of both engines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from sagellm.models.default_model import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        return worker_main(args)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in WORKERS:
            raise SystemExit(f"--engines: {e!r} is not one of {', '.join(WORKERS)}")
    work = build_workload(args, Path(args.model))
    results: dict[str, dict] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(work, f)
    try:
        for e in engines:
            print(f"running {e} ...", file=sys.stderr, flush=True)
            results[e] = run_engine(e, args, f.name)
    finally:
        os.unlink(f.name)
    from sagellm.backends.cpu import cpu_model

    report = {
        "model": args.model,
        "threads": args.threads,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "workload": {
            "decode": [len(work["decode_prompt"]), work["decode_tokens"]],
            "prompt_tokens": args.prompt_tokens,
            "concurrent": [args.concurrent, args.concurrent_output],
        },
        "results": results,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps({e: r.get("load_average") for e, r in results.items()}), "load average")
    print(render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
