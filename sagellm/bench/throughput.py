"""`sage-llm bench throughput`: offline batch throughput of sageLLM against HF transformers (and
llama.cpp where installed), same prompts, same weights, same process.

Prompts are random token ids (fixed seed) of lengths drawn from --input-len, each with its own
output length from --output-len, forced with ignore_eos so every backend generates exactly the
requested tokens. Figures: output tok/s = requested output tokens / wall time of the whole batch;
total tok/s adds the prompt tokens; batch-1 decode tok/s = (n - 1) / (time of token n - time of
token 1) for one request with a short prompt. Each backend runs a small untimed warm-up first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

from sagellm.bench import report
from sagellm.bench.shapes import SHAPES, checkpoint_folder, get_shape
from sagellm.bench.throughput_backends import (
    BACKENDS,
    DTYPES,
    ModelSource,
    Workload,
    llamacpp_available,
)
from sagellm.bench.timing import copy_bandwidth_gb_s
from sagellm.models.errors import ModelLoadError

PRESETS = {
    "default": {"num_prompts": 256, "input_len": (100, 1024), "output_len": (100, 1024)},
    "cpu-small": {"num_prompts": 16, "input_len": (32, 128), "output_len": (32, 128)},
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
HF_BATCH_NOTE = (
    "transformers cannot give each prompt its own output length in one generate call: prompts "
    "are sorted by output length and run in batches of {n} (left padding, attention mask, "
    "greedy), each batch forced to its longest output; only the tokens each prompt asked for "
    "are counted, and prompt tokens exclude padding"
)


def make_workload(
    token_ids: list[int],
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    batch1_input_len: int = 32,
    batch1_output_len: int = 128,
) -> Workload:
    """Random prompts drawn from `token_ids`; lengths uniform in the inclusive ranges."""
    rng = random.Random(seed)
    ins = [rng.randint(*input_len) for _ in range(num_prompts)]
    outs = [rng.randint(*output_len) for _ in range(num_prompts)]
    prompts = [rng.choices(token_ids, k=n) for n in ins]
    batch1 = rng.choices(token_ids, k=batch1_input_len)
    warmup = [rng.choices(token_ids, k=16) for _ in range(2)]
    return Workload(prompts, outs, batch1, batch1_output_len, warmup)


def prompt_token_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Ids both the tokenizer and the model know, without special tokens (BOS/EOS mid-prompt
    would change nothing for speed but make the text of outputs meaningless)."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]


def resolve_source(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    from sagellm.models.config import ModelConfig
    from sagellm.models.default_model import default_model_path
    from sagellm.models.gguf_loader import GGUFFile, gguf_config_dict
    from sagellm.models.resolve import resolve_model
    from sagellm.models.tokenizer import Tokenizer

    if args.shape is not None:
        shape = args.shape
        path = checkpoint_folder(shape, dtype, device=device)
        kind = "hf"
    else:
        shape = None
        resolved = resolve_model(str(args.model or default_model_path()))
        path, kind = resolved.path, resolved.kind
    if kind == "gguf":
        config = ModelConfig.from_hf_dict(gguf_config_dict(GGUFFile(path)))
        tokenizer = Tokenizer.from_gguf(path, config.hf_config["model_type"])
    else:
        config = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
        tokenizer = Tokenizer.from_folder(path)
        if tokenizer is None:
            raise ValueError(f"--model {path} ships no tokenizer files; the engine needs one")
    return ModelSource(path, kind, config, tokenizer.hf, shape.name if shape else None)


# -- arguments -------------------------------------------------------------------------------
def _length_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN-MAX") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _dtype(text: str) -> str:
    name = _DTYPE_ALIASES.get(text.lower(), text.lower())
    if name != "auto" and name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r} (choose from auto, float32, bfloat16, float16)"
        )
    return name


def _shape(text: str):
    try:
        return get_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _backends(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    for name in names:
        if name not in BACKENDS:
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})"
            )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"backend listed twice in {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PATH", help="folder, .gguf or org/name (default model)")
    model.add_argument(
        "--shape", type=_shape, metavar="NAME", help=f"random weights: {', '.join(SHAPES)}"
    )
    parser.add_argument("--dtype", type=_dtype, default="auto", help="auto: fp32 CPU, bf16 GPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--preset", choices=list(PRESETS), help="workload defaults (cpu-small on the CPU)"
    )
    parser.add_argument("--num-prompts", type=_positive)
    parser.add_argument("--input-len", type=_length_range, metavar="MIN-MAX")
    parser.add_argument("--output-len", type=_length_range, metavar="MIN-MAX")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and lengths")
    parser.add_argument(
        "--batch-1", action="store_true", help="also time batch-1 decode on each backend"
    )
    parser.add_argument("--batch-1-input-len", type=_positive, default=32, metavar="N")
    parser.add_argument("--batch-1-output-len", type=_positive, default=128, metavar="N")
    parser.add_argument(
        "--backends",
        type=_backends,
        metavar="B[,B...]",
        help="sagellm, transformers, llamacpp (default: the first two, plus llamacpp for a GGUF "
        "when llama_cpp imports)",
    )
    parser.add_argument("--threads", type=_positive, help="CPU threads of every backend")
    parser.add_argument("--max-num-seqs", type=_positive, help="sageLLM (default 64; GPU 256)")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=_positive,
        help="sageLLM step budget (default 1024; GPU 8192)",
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="sageLLM on CUDA without decode graphs"
    )
    parser.add_argument("--kv-cache-gb", type=float, help="sageLLM KV cache size")
    parser.add_argument(
        "--hf-batch-size", type=_positive, help="transformers batch (default 16 CPU, 64 GPU)"
    )
    parser.add_argument("--copy-mib", type=_positive, default=256, help="copy-bandwidth buffer")
    parser.add_argument("--output", metavar="FILE.json", help="write the results as JSON")


def _finish_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the device-dependent defaults and reject combinations argparse cannot see."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    gpu = args.device == "cuda"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if gpu else "float32"
    args.preset = args.preset or ("default" if gpu else "cpu-small")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.hf_batch_size = args.hf_batch_size or (64 if gpu else 16)
    if args.max_num_seqs is None and gpu:
        args.max_num_seqs = 256
    if args.max_num_batched_tokens is None and gpu:
        # A GPU prefills thousands of tokens in the time a Python step costs: large chunks.
        args.max_num_batched_tokens = 8192
    if args.batch_1_output_len < 2:
        parser.error(f"--batch-1-output-len {args.batch_1_output_len}: decode needs at least 2")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        parser.error(f"--kv-cache-gb {args.kv_cache_gb}: must be > 0")
    is_gguf = args.shape is None and str(args.model or ".gguf").endswith(".gguf")
    if args.backends is None:
        args.backends = ["sagellm", "transformers"]
        if is_gguf and llamacpp_available():
            args.backends.append("llamacpp")
    elif "llamacpp" in args.backends:
        if not llamacpp_available():
            parser.error("--backends llamacpp: the llama_cpp module does not import")
        if not is_gguf:
            parser.error("--backends llamacpp needs a GGUF model (--model FILE.gguf or default)")


# -- running ---------------------------------------------------------------------------------
def _load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_backends(
    args: argparse.Namespace, source: ModelSource, workload: Workload
) -> dict[str, dict]:
    results = {}
    for name in args.backends:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        before = _load_avg()
        results[name] = BACKENDS[name](args, source, workload)
        if before is not None:
            # Per backend: on a shared machine, a busy spell during one backend skews the ratio.
            results[name]["load_avg_1m"] = [before, _load_avg()]
        gc.collect()  # the next backend loads its own copy of the weights
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each backend's figures over transformers' (above 1: faster than transformers)."""
    base = results.get("transformers")
    if base is None:
        return {}
    out = {}
    for name, res in results.items():
        if name == "transformers":
            continue
        r = {}
        for key in ("output_tok_s", "total_tok_s"):
            if key in res.get("batch", {}) and key in base.get("batch", {}):
                r[key] = res["batch"][key] / base["batch"][key]
        if "decode_tok_s" in res.get("batch_1", {}) and "decode_tok_s" in base.get("batch_1", {}):
            r["batch_1_decode_tok_s"] = (
                res["batch_1"]["decode_tok_s"] / base["batch_1"]["decode_tok_s"]
            )
        out[name] = r
    return out


def format_table(results: dict[str, dict], rel: dict[str, dict[str, float]]) -> str:
    header = (
        "backend",
        "load s",
        "out tok/s",
        "total tok/s",
        "b1 tok/s",
        "b1 roofline",
        "of roofline",
        "x HF out",
        "x HF b1",
    )
    rows = [header]
    for name, res in results.items():
        batch, b1, r = res.get("batch", {}), res.get("batch_1", {}), rel.get(name, {})

        def cell(value, fmt="{:.1f}"):
            return fmt.format(value) if value is not None else "-"

        frac = b1.get("fraction_of_roofline")
        rows.append(
            (
                name,
                cell(res.get("load_time_s"), "{:.2f}"),
                cell(batch.get("output_tok_s")),
                cell(batch.get("total_tok_s")),
                cell(b1.get("decode_tok_s")),
                cell(b1.get("roofline_tok_s")),
                cell(100 * frac if frac is not None else None, "{:.0f}%"),
                cell(r.get("output_tok_s"), "{:.2f}") if name != "transformers" else "1.00",
                cell(r.get("batch_1_decode_tok_s"), "{:.2f}") if name != "transformers" else "1.00",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    parser = args.throughput_parser
    _finish_arguments(args, parser)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        try:
            source = resolve_source(args, dtype, device)
        except (ModelLoadError, ValueError, OSError) as exc:
            parser.error(str(exc))
        longest = args.input_len[1] + args.output_len[1]
        longest_b1 = args.batch_1_input_len + args.batch_1_output_len
        if max(longest, longest_b1) > source.config.max_position:
            parser.error(
                f"a request of up to {max(longest, longest_b1)} tokens exceeds the model's "
                f"{source.config.max_position} positions"
            )
        ids = prompt_token_ids(source.tokenizer, source.config.vocab_size)
        workload = make_workload(
            ids,
            args.num_prompts,
            args.input_len,
            args.output_len,
            args.seed,
            args.batch_1_input_len,
            args.batch_1_output_len,
        )
        copy_bw = copy_bandwidth_gb_s(device, mib=args.copy_mib)
        context = report.machine_context(device, copy_bw, args.copy_mib)
        results = run_backends(args, source, workload)
        if hasattr(os, "getloadavg"):
            context["load_avg_end_1m"] = os.getloadavg()[0]
    finally:
        torch.set_num_threads(threads_before)

    for res in results.values():
        b1 = res.get("batch_1")
        if b1 and "weight_bytes" in res:
            # Decode at batch 1 reads every weight once per token: the copy bandwidth over the
            # weight bytes is the most tokens per second memory allows.
            b1["roofline_tok_s"] = copy_bw * 1e9 / res["weight_bytes"]
            b1["fraction_of_roofline"] = b1["decode_tok_s"] / b1["roofline_tok_s"]
    rel = ratios(results)
    payload = {
        "context": context,
        "parameters": _parameters(args, source),
        "workload": {
            "num_prompts": len(workload.prompts),
            "prompt_tokens": workload.prompt_tokens,
            "output_tokens": workload.output_tokens,
            "batch_1_prompt_tokens": len(workload.batch1_prompt),
            "batch_1_output_tokens": workload.batch1_output_len,
        },
        "backends": results,
        "ratios_vs_transformers": rel,
        "notes": [HF_BATCH_NOTE.format(n=args.hf_batch_size)] if "transformers" in results else [],
    }
    print(report.format_context(context))
    print(
        f"model {payload['parameters']['model']} ({args.dtype}); {len(workload.prompts)} prompts, "
        f"in {args.input_len[0]}-{args.input_len[1]}, out {args.output_len[0]}-"
        f"{args.output_len[1]} tokens; load avg {context.get('load_avg_1m', float('nan')):.2f}"
        f" -> {context.get('load_avg_end_1m', float('nan')):.2f}"
    )
    for note in payload["notes"]:
        print(f"note: {note}")
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(
        "b1 = batch-1 decode tok/s; b1 roofline = copy bandwidth / weight bytes (every weight "
        "read once per token); x HF = ratio to transformers (above 1: faster)"
    )
    print(format_table(results, rel))  # the table last
    return 0


def _parameters(args: argparse.Namespace, source: ModelSource) -> dict[str, Any]:
    params = {
        "model": str(source.path),
        "model_format": source.kind,
        "dtype": args.dtype,
        "device": args.device,
        "preset": args.preset,
        "num_prompts": args.num_prompts,
        "input_len": list(args.input_len),
        "output_len": list(args.output_len),
        "seed": args.seed,
        "backends": args.backends,
        "threads": args.threads or torch.get_num_threads(),
        "hf_batch_size": args.hf_batch_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_gb": args.kv_cache_gb,
        "enforce_eager": args.enforce_eager or None,
    }
    if source.shape:
        params["shape"] = source.shape
    if args.batch_1:
        params["batch_1"] = {
            "input_len": args.batch_1_input_len,
            "output_len": args.batch_1_output_len,
        }
    return {key: value for key, value in params.items() if value is not None}


def build_parser(prog: str = "sage-llm bench throughput") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(throughput_parser=parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "sage-llm bench throughput") -> int:
    return run(build_parser(prog).parse_args(argv))
