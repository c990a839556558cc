"""Offline batch throughput of sageLLM against HF transformers (and llama.cpp), same run.

    python benchmarks/throughput.py                          # default model, CPU preset
    python benchmarks/throughput.py --dtype bfloat16 --batch-1 --output smollm2.json
    python benchmarks/throughput.py --shape qwen2.5-0.5b --device cuda --batch-1   # GPU, random weights

The same as `sage-llm bench throughput`; options and figures are described in
sagellm/bench/throughput.py (`--help` lists them).

Weight formats end to end (issue 8): `--quantization none,int8,int4` runs sageLLM once per
format on the same workload, one after another in one process, and ends with a table of batch-1
decode tok/s and offline output tok/s per format, each with its ratio to the first format's:

    python benchmarks/throughput.py --shape llama3-8b --device cuda --batch-1 \\
        --quantization none,int8,int4 --output e2e_quant.json

Only the sageLLM backend runs in a sweep (transformers has no int8 / int4 kernels of ours to
compare); its per-format JSON goes into the sweep's --output under "runs".
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

from sagellm.bench import throughput

FORMATS = ("none", "int8", "int4", "fp8")


def _formats(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    bad = [s for s in items if s not in FORMATS]
    if bad or not items or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected distinct formats among {', '.join(FORMATS)}"
        )
    return items


def sweep_table(runs: dict[str, dict]) -> str:
    """One row per format: decode and output tok/s, and their ratios to the first format."""
    base = next(iter(runs.values()))["backends"]["sagellm"]
    header = ("format", "weights GB", "b1 tok/s", "x first", "out tok/s", "x first", "total tok/s")
    rows = [header]
    for name, run in runs.items():
        res = run["backends"]["sagellm"]
        b1 = res.get("batch_1", {}).get("decode_tok_s")
        b1_base = base.get("batch_1", {}).get("decode_tok_s")
        out, out_base = res["batch"]["output_tok_s"], base["batch"]["output_tok_s"]
        rows.append((
            name,
            f"{res['weight_bytes'] / 1e9:.2f}",
            f"{b1:.1f}" if b1 else "-",
            f"{b1 / b1_base:.2f}" if b1 and b1_base else "-",
            f"{out:.1f}",
            f"{out / out_base:.2f}",
            f"{res['batch']['total_tok_s']:.1f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace) -> int:
    formats, output = args.quantization, args.output
    if args.backends not in (None, ["sagellm"]):
        args.throughput_parser.error("--quantization sweeps run the sagellm backend only")
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in formats:
            print(f"=== quantization {name} ===", flush=True)
            one = copy.copy(args)
            one.quantization = None if name == "none" else name
            one.backends = ["sagellm"]
            one.output = str(Path(tmp) / f"{name}.json")
            status = throughput.run(one)
            if status != 0:
                return status
            runs[name] = json.loads(Path(one.output).read_text())
    # A format that did not reach the engine would be timed as dense under its name.
    if "none" in runs:
        dense_bytes = runs["none"]["backends"]["sagellm"]["weight_bytes"]
        for name, run in runs.items():
            if name != "none" and run["backends"]["sagellm"]["weight_bytes"] >= dense_bytes:
                raise RuntimeError(
                    f"quantization {name}: the engine's weights are no smaller than dense; "
                    "EngineConfig.quantization did not reach the engine"
                )
    first = next(iter(runs.values()))
    print(f"\n=== weight formats, same workload ({first['parameters']['model']}) ===")
    print(
        "b1 = batch-1 decode tok/s; out = offline output tok/s; x first = ratio to the "
        f"{formats[0]} row"
    )
    print(sweep_table(runs))
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"formats": formats, "runs": runs}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = throughput.build_parser("benchmarks/throughput.py")
    parser.add_argument(
        "--quantization",
        type=_formats,
        metavar="F[,F...]",
        help="sweep sageLLM over weight formats: none, int8, int4, fp8 (CUDA); e.g. none,int8,int4",
    )
    args = parser.parse_args(argv)
    if args.quantization is None:  # one plain run, as `sage-llm bench throughput`
        return throughput.run(args)
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
