"""Default sweep of the fused small ops and the KV-cache write (issue 2): sageLLM vs the pure-torch
reference, at decode-like (8 tokens) and prefill-like (1024 tokens) batch sizes.

    python benchmarks/ops/bench_small_ops.py [--dtype bf16,fp32] [--output small_ops.json] ...

Shapes are a Llama-3-8B layer: hidden 4096, 32/8 heads of 128, MLP width 14336.
--quick runs small shapes as a smoke test.
"""

from __future__ import annotations

import argparse
import sys

from sagellm.bench.cli import add_run_options, run_plan, sweep_configs

OPS = (
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_and_mul",
    "reshape_and_cache",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    args = parser.parse_args(argv)

    # Each op keeps its own default width (--hidden 4096 for norms, 14336 for activations).
    given = {"tokens": [4, 64]} if args.quick else {"tokens": [8, 1024]}
    if args.quick:
        given["hidden"] = [256]
    configs = sweep_configs(list(OPS), args.dtype, given, args.device, args.seed)
    return run_plan(configs, args, parser)


if __name__ == "__main__":
    sys.exit(main())
