"""Default sweep of the paged attention kernels (issue 2): sageLLM vs the pure-torch reference vs
torch SDPA on the same K/V laid out contiguously.

    python benchmarks/ops/bench_attention.py [--dtype bf16,fp32] [--output attention.json] ...

Decode: the issue's reference case (8 sequences, 32/8 heads, d=128, block 16) over contexts 512,
2048 and 8192. Prefill: one whole 1024-token prompt, and a 512-token chunk extending a 2048-token
context (chunked prefill / prefix-cache hit). --quick runs small shapes as a smoke test.
"""

from __future__ import annotations

import argparse
import sys

from sagellm.bench.cli import add_run_options, run_plan, sweep_configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    args = parser.parse_args(argv)

    def sweep(op: str, **given: list[int]):
        return sweep_configs([op], args.dtype, given, args.device, args.seed)

    if args.quick:
        configs = sweep("paged_attention_decode", batch=[2], context=[128, 512])
        configs += sweep("paged_attention_prefill", context=[256], tokens=[64, 256])
    else:
        configs = sweep("paged_attention_decode", batch=[8], context=[512, 2048, 8192])
        configs += sweep("paged_attention_prefill", context=[1024], tokens=[1024])
        configs += sweep("paged_attention_prefill", context=[2048], tokens=[512])
    return run_plan(configs, args, parser)


if __name__ == "__main__":
    sys.exit(main())
