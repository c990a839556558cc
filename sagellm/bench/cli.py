"""`sage-llm bench` / `python -m sagellm.bench`: the op microbenchmark command line.

`bench op NAME ...` times a sageLLM kernel and its pure-torch reference (and, for attention,
torch SDPA on a fused backend) in the same run, over the cartesian product of every
comma-separated option, and reports time, GB/s (TB/s on a GPU), GFLOP/s, the fraction of the
copy bandwidth it measured at start, for attention the fraction of the bf16 GEMM rate it measured
too, and each baseline's time over the kernel's. On CUDA the default shapes are large (the inputs
are well past L2) and the L2 cache is flushed before every timed call.

The top-level CLI mounts this with:
    bench = subcommands.add_parser("bench"); add_arguments(bench); bench.set_defaults(func=run)
and later calls run(args). Further bench subcommands (throughput, serve, quality) register next
to `op` in add_arguments.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from tqdm import tqdm

from sagellm import ops
from sagellm.bench import report, throughput
from sagellm.bench.op_cases import OPS, PARAM_FLAGS, CaseConfig, case_params, validate
from sagellm.bench.timing import copy_bandwidth_gb_s, gemm_tflops, time_callable

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def _comma_list(text: str, convert: Callable[[str], Any], what: str) -> list[Any]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in {what} list {text!r}")
    return [convert(item) for item in items]


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def convert(item: str) -> int:
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return convert


def _positive_ints(text: str) -> list[int]:
    return _comma_list(text, _int_at_least(1), "integer")


def _dtypes(text: str) -> list[torch.dtype]:
    def convert(item: str) -> torch.dtype:
        if item.lower() not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {item!r} (choose from bf16, fp16, fp32)"
            )
        return DTYPES[item.lower()]

    return _comma_list(text, convert, "dtype")


def _op_names(text: str) -> list[str]:
    if text == "all":
        return list(OPS)

    def convert(item: str) -> str:
        if item not in OPS:
            raise argparse.ArgumentTypeError(
                f"unknown op {item!r} (choose from {', '.join(OPS)}, or all)"
            )
        return item

    return _comma_list(text, convert, "op")


def _device(text: str) -> torch.device:
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (choose from cpu, cuda)")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for but torch sees no CUDA device")
    return torch.device(text)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of any op run (device, timing, output); shared with benchmarks/ops scripts."""
    parser.add_argument(
        "--dtype",
        type=_dtypes,
        default=[torch.bfloat16],
        metavar="DTYPE[,DTYPE...]",
        help="bf16, fp16, fp32 (default bf16)",
    )
    parser.add_argument("--device", type=_device, default=torch.device("cpu"), metavar="{cpu,cuda}")
    parser.add_argument(
        "--warmup", type=_int_at_least(0), default=2, help="untimed calls (default 2)"
    )
    parser.add_argument(
        "--iters", type=_int_at_least(1), default=None, help="timed calls (default: ~1 s worth)"
    )
    parser.add_argument("--threads", type=_int_at_least(1), help="torch.set_num_threads")
    parser.add_argument("--cpu-isa", choices=ops.build_info()["cpu_isas_supported"])
    parser.add_argument(
        "--copy-mib", type=_int_at_least(1), default=256, help="copy-bandwidth buffer size (MiB)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--output", metavar="FILE.json", help="write the records as JSON")
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="time only the sageLLM kernel (no reference, no SDPA)",
    )


def _add_op_command(subcommands: argparse._SubParsersAction) -> None:
    defaults = "\n".join(
        f"  {op:<24} {report.shape_label(case_params(op, {}))}\n"
        f"  {'':<24} cuda: {report.shape_label(case_params(op, {}, 'cuda'))}"
        for op in OPS
    )
    parser = subcommands.add_parser(
        "op",
        help="time one op (or all) against its pure-torch reference",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Time a sageLLM op and its pure-torch reference (and torch SDPA for attention).\n"
            "Comma-separated values sweep: --context 512,2048,8192 runs each."
        ),
        epilog=(
            "default shapes (B batch, C context, T tokens, H heads/kv heads, D head size,\n"
            f"S block size, N hidden, KVH kv heads; prefill's T defaults to its C):\n{defaults}"
        ),
    )
    parser.add_argument("name", type=_op_names, metavar="NAME", help=f"{', '.join(OPS)} or all")
    for name, flag in PARAM_FLAGS.items():
        parser.add_argument(
            flag, dest=name, type=_positive_ints, metavar="N[,N...]", help="default: per op"
        )
    add_run_options(parser)
    parser.set_defaults(bench_run=run_op, bench_parser=parser)


def _add_throughput_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "throughput",
        help="offline batch tok/s of sageLLM against transformers on the same prompts",
        description=throughput.__doc__.split("\n\n")[0],
    )
    throughput.add_arguments(parser)
    parser.set_defaults(bench_run=throughput.run, throughput_parser=parser)


def _add_quality_command(subcommands: argparse._SubParsersAction) -> None:
    from sagellm.bench import quality

    parser = subcommands.add_parser(
        "quality",
        help="perplexity and greedy agreement of each weight format and KV dtype vs dense",
        description=quality.__doc__.split("\n\n")[0],
    )
    quality.add_arguments(parser)
    parser.set_defaults(bench_run=quality.run, quality_parser=parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Install the bench subcommands on `parser` (the top-level CLI's `bench` parser)."""
    subcommands = parser.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    _add_op_command(subcommands)
    _add_throughput_command(subcommands)
    _add_quality_command(subcommands)
    _add_server_commands(subcommands)


def _add_server_commands(subcommands: argparse._SubParsersAction) -> None:
    """`serve` (open-loop load: TTFT/TBT p50/p99, throughput, errors) and `soak` (long
    concurrent run with cancels and bad requests: lost requests, leaked blocks, memory)."""
    from sagellm.bench import serving, soak

    for name, mod, text in (
        ("serve", serving, "open-loop serving benchmark against a server (or one it spawns)"),
        ("soak", soak, "soak test: concurrent streams, cancels, bad requests; leaks and losses"),
    ):
        p = subcommands.add_parser(name, help=text, description=mod.__doc__.split("\n\n")[0])
        mod.add_arguments(p)
        p.set_defaults(bench_run=lambda a, run=mod.run: run(a, getattr(a, "app_factory", None)))


def run(args: argparse.Namespace) -> int:
    """Run the bench subcommand `args` was parsed for; returns the exit status."""
    return args.bench_run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sagellm.bench", description="sageLLM benchmarks"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def sweep_configs(
    op_names: list[str],
    dtypes: list[torch.dtype],
    given: dict[str, list[int]],
    device: torch.device,
    seed: int = 0,
) -> list[CaseConfig]:
    """The cartesian product of dtypes and the given values of each parameter the op reads."""
    configs = []
    for op in op_names:
        names = [name for name in OPS[op].defaults if name in given]
        for dtype in dtypes:
            for values in itertools.product(*(given[name] for name in names)):
                params = case_params(op, dict(zip(names, values, strict=True)), device)
                configs.append(CaseConfig(op, dtype, device, params, seed))
    return configs


@contextmanager
def _settings(threads: int | None, cpu_isa: str | None):
    """Apply --threads / --cpu-isa for the run and restore them (main() may run in-process)."""
    threads_before, isa_before = torch.get_num_threads(), ops.cpu_isa()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if cpu_isa is not None:
            ops.set_cpu_isa(cpu_isa)
        yield
    finally:
        torch.set_num_threads(threads_before)
        ops.set_cpu_isa(isa_before)


def _run_case(
    cfg: CaseConfig, args: argparse.Namespace, copy_bw: float, gemm: float | None = None
) -> dict[str, Any]:
    case = OPS[cfg.op].build(cfg)
    timed = {"kernel": case.kernel}
    if args.reference:
        timed["reference"] = case.reference
        if case.sdpa is not None:
            timed["sdpa"] = case.sdpa
    timings = {
        name: time_callable(fn, cfg.device, warmup=args.warmup, iters=args.iters)
        for name, fn in timed.items()
    }
    return report.make_record(cfg, case, timings, copy_bw, gemm)


def run_configs(
    configs: list[CaseConfig], args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Measure copy bandwidth (and, when a case counts FLOPs, the bf16 GEMM rate), then every
    config: (machine context, records, errors)."""
    device = configs[0].device
    repeats = 20 if device.type == "cuda" else 5  # a GPU copy takes ~0.1 ms: take more samples
    copy_bw = copy_bandwidth_gb_s(device, mib=args.copy_mib, repeats=repeats)
    context = report.machine_context(device, copy_bw, args.copy_mib)
    gemm = None
    if any(cfg.op.startswith("paged_attention") for cfg in configs):
        gemm = gemm_tflops(device)
        context["gemm_bf16_tflop_s"] = gemm
    records, errors = [], []
    progress = tqdm(
        configs, desc="bench op", unit="case", file=sys.stderr, disable=len(configs) < 2 or None
    )
    for cfg in progress:
        progress.set_postfix_str(f"{cfg.op} {report.shape_label(cfg.params)}", refresh=False)
        try:
            records.append(_run_case(cfg, args, copy_bw, gemm))
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            # One unsupported case (an op not built, a head size not compiled) must not hide
            # the rest of a sweep; it is reported and makes the exit status non-zero.
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            errors.append(
                {
                    "op": cfg.op,
                    "params": cfg.params,
                    "dtype": report.DTYPE_NAMES[cfg.dtype],
                    "error": f"{type(exc).__name__}: {first_line}",
                }
            )
    # Measured again at the end: a large drift means something else used the memory bus or the
    # cores during the run, so its numbers are noisy.
    copy_bw_end = copy_bandwidth_gb_s(device, mib=args.copy_mib, repeats=repeats)
    context["copy_bw_end_gb_s"] = copy_bw_end
    if max(copy_bw, copy_bw_end) > 1.25 * min(copy_bw, copy_bw_end):
        print(
            f"warning: copy bandwidth moved from {copy_bw:.1f} to {copy_bw_end:.1f} GB/s during "
            "the run; the machine was busy and the figures are noisy",
            file=sys.stderr,
        )
    return context, records, errors


def run_plan(
    configs: list[CaseConfig], args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    """Validate, run and report `configs` with the options of add_run_options; exit status."""
    try:
        for cfg in configs:
            validate(cfg.op, cfg.params)
    except ValueError as exc:
        parser.error(str(exc))

    with _settings(args.threads, args.cpu_isa):
        context, records, errors = run_configs(configs, args)
    for error in errors:
        shape = report.shape_label(error["params"])
        print(f"error: {error['op']} {error['dtype']} {shape}: {error['error']}", file=sys.stderr)
    if args.output:
        report.write_json(args.output, context, records, errors)
    report.print_report(context, records)  # the table last
    return 1 if errors else 0


def run_op(args: argparse.Namespace) -> int:
    """The `op` subcommand."""
    given = {name: getattr(args, name) for name in PARAM_FLAGS if getattr(args, name) is not None}
    if len(args.name) == 1:
        unused = [PARAM_FLAGS[n] for n in given if n not in OPS[args.name[0]].defaults]
        if unused:
            print(f"note: {args.name[0]} does not use {', '.join(unused)}", file=sys.stderr)
    configs = sweep_configs(args.name, args.dtype, given, args.device, args.seed)
    return run_plan(configs, args, args.bench_parser)
