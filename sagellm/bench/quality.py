"""`sage-llm bench quality`: what each weight format and KV-cache dtype costs in accuracy.

Perplexity of the model on a fixed local text (sagellm/bench/data/quality_text.txt, the Python
Language Reference, PSF licence; or --text), and greedy agreement with the dense model, for:
the dense model (fp32 on the CPU, bf16 on CUDA), each weight format that runs on the device
(see quality_variants), and each quantized KV-cache dtype. Each quantized row has a perplexity
budget, the largest relative change from the dense row (BUDGETS, either way: a quantized model
clearly better than dense means the comparison is broken); a row over its budget makes the exit
status 1, and so does a row that failed to run.

Everything runs through the engine: one LLMEngine per KV dtype (prefix caching off, eager),
each weight variant's model put in its runner. The text is cut into windows of --window tokens,
each scored from its first token as one request that the scheduler prefills in chunks of --chunk
tokens through the paged cache, so later chunks attend to K/V read back from the (possibly
quantized) cache. The log-probability of every next token comes from the hidden states of the
prefill steps (the engine samples only a window's last position, so they are read beside it).
Greedy agreement: for each fixed question (chat-formatted when the model has a template), the
share of the dense model's answer (up to --gen-tokens, ending at its EOS) generated before the
first token that differs, averaged over the questions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sagellm.bench import quality_variants as qv

TEXT = Path(__file__).parent / "data" / "quality_text.txt"
KV_DTYPES = ("auto", "int8", "fp8_e4m3")
# Perplexity budget per row: the largest relative change from dense, in percent, by bits. Set
# for the default model, SmolLM2-135M, measured on this text (fp32, CPU): a 135M model is hit
# hardest, and its only weights are already 4-bit (Q4_1), so the dense row is that file
# dequantized and every other grid rounds them a second time (Q5_1 +13%, Q5_0 +9%, Q4_0 +23%,
# int4 g128 with zero points +28%; Q4_1 +0.2%, being the file's own grid). 8-bit weights and
# KV move it by under 0.5% (file +0.4%: int8 activation rounding; Q8_0 +0.4%; int8 +0.15%;
# KV int8 +0.05%, KV fp8 +1.0%). A 7B model on its original weights would use tighter budgets
# (--budget). A broken format (a misread nibble, scales off by 2x) costs far more.
BUDGETS = {
    "file": 1.0,
    "Q8_0": 1.0,
    "int8": 1.0,
    "fp8": 3.0,
    "Q5_1": 20.0,
    "Q5_0": 20.0,
    "Q4_1": 35.0,
    "Q4_0": 35.0,
    "int4": 35.0,
    "kv int8": 1.0,
    "kv fp8_e4m3": 2.0,
}
# Greedy agreement prompts: questions, in the model's chat template when it has one.
PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Name the three primary colors.",
)


def encode_prompt(tokenizer, text: str) -> list[int]:
    if tokenizer.has_chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return tokenizer.encode(chat, add_special_tokens=False)
    return tokenizer.encode(text)


def read_text(path: Path) -> str:
    """The text to score: the file without its leading comment header (up to '# ---')."""
    text = path.read_text(encoding="utf-8")
    head, sep, body = text.partition("# ---\n")
    return body if sep and all(line.startswith("#") for line in head.splitlines()) else text


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive windows of `size` tokens; a shorter last one is kept if it scores any."""
    return [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) > 1]


class Scorer:
    """Stands in for the model in the runner: runs it, and while a window is being prefilled
    adds the log-probability of each next token of the window."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.window: torch.Tensor | None = None
        self.nll, self.scored = 0.0, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, input_ids, positions, *args, **kwargs):
        hidden = self.model(input_ids, positions, *args, **kwargs)
        if self.window is not None:
            pos = positions.to(self.window.device)
            keep = pos + 1 < self.window.numel()
            if bool(keep.any()):
                rows = keep.nonzero().squeeze(1).to(hidden.device)
                logp = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), -1)
                target = self.window[pos[keep] + 1].to(logp.device)
                self.nll -= logp.gather(1, target[:, None]).sum().item()
                self.scored += int(keep.sum())
        return hidden


def score(engine, model, texts: list[list[int]], prompts: list[list[int]], gen: int) -> dict:
    """Perplexity over `texts` and greedy continuations of `prompts` with `model` in the
    engine's runner."""
    from sagellm.runtime.params import SamplingParams

    scorer = Scorer(model)
    runner_model = engine.runner.model
    engine.runner.model = scorer
    t0 = time.perf_counter()
    try:
        for w in texts:
            scorer.window = torch.tensor(w)
            before = scorer.scored
            engine.generate([w], SamplingParams(max_tokens=1))
            if scorer.scored - before != len(w) - 1:  # a preemption would score tokens twice
                raise RuntimeError(
                    f"scored {scorer.scored - before} positions of a {len(w)}-token window"
                )
        scorer.window = None
        t1 = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_tokens=gen))
    finally:
        engine.runner.model = runner_model
    return {
        "perplexity": math.exp(scorer.nll / scorer.scored),
        "nll_per_token": scorer.nll / scorer.scored,
        "scored_tokens": scorer.scored,
        "greedy": [list(o.token_ids) for o in outs],
        "score_s": t1 - t0,
        "generate_s": time.perf_counter() - t1,
    }


def agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Mean over prompts of the share of tokens before the first difference."""
    shares = []
    for g, w in zip(got, want, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        shares.append(same / max(len(w), 1))
    return sum(shares) / len(shares)


# -- arguments --------------------------------------------------------------------------------
def _choices(allowed: tuple[str, ...], what: str):
    def convert(text: str) -> list[str]:
        items = list(allowed) if text == "all" else [s.strip() for s in text.split(",")]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or text!r} (choose from {', '.join(allowed)}, all)"
            )
        return list(dict.fromkeys(items))

    return convert


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _budget(text: str) -> tuple[str, float]:
    name, sep, pct = text.rpartition("=")
    if not sep or name not in BUDGETS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ROW=PERCENT with ROW one of {', '.join(BUDGETS)}"
        )
    try:
        value = float(pct)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{pct!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"budget {value} must be >= 0")
    return name, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="folder, .gguf or org/name (default model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
        help="dense dtype (auto: float32 on the CPU, bfloat16 on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--formats", type=_choices(qv.WEIGHT_FORMATS, "format"), default=list(qv.WEIGHT_FORMATS),
        metavar="F[,F...]", help=f"{', '.join(qv.WEIGHT_FORMATS)} (default: all that run here)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-dtypes", type=_choices(KV_DTYPES, "KV dtype"), default=list(KV_DTYPES),
        metavar="D[,D...]", help="auto, int8, fp8_e4m3 (auto: the weight formats' runs)",
    )  # fmt: skip
    parser.add_argument("--text", type=Path, default=TEXT, help="text file to score")
    parser.add_argument("--max-tokens", type=_positive, help="score only the first N tokens")
    parser.add_argument("--window", type=_positive, default=512, help="tokens per window")
    parser.add_argument("--chunk", type=_positive, default=256, help="prefill chunk (step budget)")
    parser.add_argument("--gen-tokens", type=_positive, default=32, help="greedy tokens/prompt")
    parser.add_argument(
        "--budget", type=_budget, action="append", default=[], metavar="ROW=PCT",
        help="override a row's perplexity budget, e.g. int4=10 or 'kv int8=1' (repeatable)",
    )  # fmt: skip
    parser.add_argument("--threads", type=_positive, help="torch CPU threads")
    parser.add_argument("--output", metavar="FILE.json", help="write the results as JSON")


# -- running -----------------------------------------------------------------------------------
def _engine(args, kv: str, longest: int):
    from sagellm.runtime.config import EngineConfig
    from sagellm.runtime.engine import LLMEngine

    extra = {} if kv == "auto" else {"kv_cache_dtype": kv}
    return LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            max_model_len=longest,
            max_num_seqs=len(PROMPTS),
            max_num_batched_tokens=args.chunk,
            enable_prefix_caching=False,  # every window position must be computed, not reused
            enforce_eager=True,
            load_progress=False,
            **extra,
        )
    )


def _context(device: torch.device) -> dict[str, Any]:
    import sagellm
    from sagellm import ops
    from sagellm.bench.report import cpu_model

    context = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "sagellm_version": sagellm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_isa": ops.cpu_isa(),
        "cpu_model": cpu_model(),
    }
    if device.type == "cuda":
        context["gpu_name"] = torch.cuda.get_device_name(device)
    return context


def run_rows(args) -> tuple[list[dict], list[str]]:
    """Every row: (records, notes). A record has "error" instead of figures when it failed."""
    from sagellm.models.checkpoint import load_checkpoint
    from sagellm.models.registry import model_class

    ckpt = load_checkpoint(args.model, dtype=args.dtype, progress=False)
    ids = ckpt.tokenizer.encode(read_text(args.text))[: args.max_tokens]
    texts = windows(ids, args.window)
    if not texts:
        args.quality_parser.error(f"--text {args.text}: fewer than 2 tokens to score")
    prompts = [encode_prompt(ckpt.tokenizer, p) for p in PROMPTS]
    longest = max(args.window, *(len(p) for p in prompts)) + args.gen_tokens
    device, notes = torch.device(args.device), []
    kind = "gguf" if ckpt.format == "gguf" else "hf"
    records: list[dict] = []
    dense_engine = _engine(args, "auto", longest)
    config = dense_engine.model_config
    formats = ["dense", *(f for f in args.formats if f != "dense")]
    for fmt in formats:
        why = qv.unavailable(fmt, device, kind, model_class(config.architecture))
        if why:
            notes.append(f"skipped {why}")
            continue
        if fmt == "dense":  # the engine's own model
            build = lambda e=dense_engine: e.model  # noqa: E731
        else:
            build = lambda f=fmt: _variant(f, args, ckpt, device)  # noqa: E731
        records.append(_row(fmt, "weights", build, dense_engine, texts, prompts, args))
    del dense_engine
    for kv in args.kv_dtypes:
        if kv == "auto":
            continue
        try:
            engine = _engine(args, kv, longest)
        except (ValueError, RuntimeError) as exc:  # refused here: a note, not a failure
            notes.append(f"skipped kv {kv}: {exc}")
            continue
        records.append(
            _row(f"kv {kv}", "kv", lambda e=engine: e.model, engine, texts, prompts, args)
        )
        del engine
    dense = records[0]
    for r in records[1:]:
        if "perplexity" in r and "perplexity" in dense:
            r["ppl_increase_pct"] = 100 * (r["perplexity"] / dense["perplexity"] - 1)
            r["greedy_agreement"] = agreement(r["greedy"], dense["greedy"])
            r["budget_pct"] = args.budgets[r["format"]]
            # Both ways: a quantized model clearly better than dense means a broken comparison.
            r["within_budget"] = abs(r["ppl_increase_pct"]) <= r["budget_pct"]
    return records, notes


def _variant(fmt: str, args, ckpt, device: torch.device):
    file_weights = None
    if fmt == "file":
        from sagellm.models.checkpoint import load_checkpoint

        file_weights = load_checkpoint(
            args.model, dtype=ckpt.dtype, progress=False, load_tokenizer=False, quantized_on=device
        ).weights
    return qv.build_variant(fmt, ckpt.config, ckpt.weights, ckpt.dtype, device, file_weights)


def _row(fmt: str, kind: str, build, engine, texts, prompts, args) -> dict:
    print(f"scoring {fmt} ...", file=sys.stderr, flush=True)
    record: dict[str, Any] = {"format": fmt, "kind": kind}
    try:
        t0 = time.perf_counter()
        model = build()
        record["build_s"] = time.perf_counter() - t0
        record["weight_bytes"] = qv.weight_bytes(model)
        record.update(score(engine, model, texts, prompts, args.gen_tokens))
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        record["error"] = f"{type(exc).__name__}: {first}"
    return record


def format_table(records: list[dict]) -> str:
    header = ("format", "weights MB", "perplexity", "vs dense", "budget", "greedy agree", "check")
    rows = [header]
    for r in records:
        if "error" in r:
            rows.append((r["format"], "-", "-", "-", "-", "-", f"ERROR {r['error']}"))
            continue
        inc, budget = r.get("ppl_increase_pct"), r.get("budget_pct")
        status = "" if inc is None else ("ok" if r["within_budget"] else "OVER BUDGET")
        rows.append((
            r["format"],
            f"{r['weight_bytes'] / 2**20:.1f}",
            f"{r['perplexity']:.4f}",
            "-" if inc is None else f"{inc:+.2f}%",
            "-" if budget is None else f"{budget:.1f}%",
            "-" if inc is None else f"{100 * r['greedy_agreement']:.0f}%",
            status,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        args.quality_parser.error("--device cuda: torch sees no CUDA device")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if not args.text.is_file():
        args.quality_parser.error(f"--text {args.text}: no such file")
    args.budgets = {**BUDGETS, **dict(args.budget)}
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        context = _context(torch.device(args.device))
        records, notes = run_rows(args)
    finally:
        torch.set_num_threads(threads_before)
    payload = {
        "context": context,
        "parameters": {
            "model": args.model or "default",
            "dtype": args.dtype,
            "text": str(args.text),
            "window": args.window,
            "chunk": args.chunk,
            "max_tokens": args.max_tokens,
            "gen_tokens": args.gen_tokens,
            "prompts": list(PROMPTS),
            "budgets_pct": args.budgets,
        },
        "records": records,
        "notes": notes,
    }
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    where = context.get("gpu_name") or context.get("cpu_model") or "unknown CPU"
    scored = records[0].get("scored_tokens", 0) if records else 0
    print(
        f"{where} | {args.device}, {context['threads']} threads | model {args.model or 'default'}"
        f" ({args.dtype}) | {scored} tokens scored in windows of {args.window} | "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    for note in notes:
        print(f"note: {note}")
    print(
        "perplexity on the fixed text; vs dense = relative increase; budget = the most allowed; "
        f"greedy agree = share of the dense model's answers (up to {args.gen_tokens} tokens, "
        f"{len(PROMPTS)} questions) before the first different token"
    )
    print(format_table(records))
    failed = [r["format"] for r in records if "error" in r or r.get("within_budget") is False]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def build_parser(prog: str = "sage-llm bench quality") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(quality_parser=parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "sage-llm bench quality") -> int:
    return run(build_parser(prog).parse_args(argv))
