"""Benchmark results: one record per case, the machine they ran on, a table and a JSON file.

Throughputs use the median time. A figure that was not measured (no reference run, no FLOP count
for an elementwise op) is left out of the record, never filled in.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import sagellm
from sagellm import ops
from sagellm.bench.op_cases import CaseConfig, OpCase
from sagellm.bench.timing import Timing

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_SHAPE_KEYS = {
    "batch": "B",
    "context": "C",
    "tokens": "T",
    "head_size": "D",
    "block_size": "S",
    "hidden": "N",
}


def cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_context(device: torch.device, copy_bw_gb_s: float, copy_mib: int) -> dict[str, Any]:
    """Where and with what the benchmark ran; copy bandwidth is the roofline the fractions use."""
    info = ops.build_info()
    context: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "sagellm_version": sagellm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_isa": info["cpu_isa"],
        "build": info,
        "copy_bw_gb_s": copy_bw_gb_s,
        "copy_buffer_mib": copy_mib,
    }
    if hasattr(os, "getloadavg"):
        # Load before the run: on a shared machine it explains noisy figures.
        context["load_avg_1m"] = os.getloadavg()[0]
    model = cpu_model()
    if model:
        context["cpu_model"] = model
    if device.type == "cuda":
        context["gpu_name"] = torch.cuda.get_device_name(device)
    return context


def _throughput(
    timing: Timing,
    bytes_moved: int,
    flops: int | None,
    copy_bw_gb_s: float,
    gemm_tflop_s: float | None = None,
) -> dict[str, Any]:
    seconds = timing.median_ms * 1e-3
    gb_s = bytes_moved / seconds / 1e9
    figures: dict[str, Any] = {
        "time_ms": {"median": timing.median_ms, "min": timing.min_ms},
        "iters": timing.iters,
        "gb_s": gb_s,
        "fraction_of_copy_bw": gb_s / copy_bw_gb_s,
    }
    if flops is not None:
        figures["gflop_s"] = flops / seconds / 1e9
        if gemm_tflop_s:
            figures["fraction_of_gemm"] = figures["gflop_s"] / (gemm_tflop_s * 1e3)
    return figures


def make_record(
    cfg: CaseConfig,
    case: OpCase,
    timings: dict[str, Timing],
    copy_bw_gb_s: float,
    gemm_tflop_s: float | None = None,
) -> dict[str, Any]:
    """One JSON record: the kernel's figures at top level, each baseline's in its own key.

    `timings` holds "kernel" and optionally "reference" and "sdpa"; a baseline's kernel_speedup
    is its median time over the kernel's (above 1: the sageLLM kernel is faster).
    fraction_of_gemm (cases that count FLOPs, when the GEMM rate was measured): GFLOP/s over the
    bf16 GEMM rate measured in the same run.
    """
    kernel = timings["kernel"]
    work = (case.bytes_moved, case.flops, copy_bw_gb_s, gemm_tflop_s)
    record: dict[str, Any] = {
        "op": cfg.op,
        "params": dict(cfg.params),
        "dtype": DTYPE_NAMES[cfg.dtype],
        "device": str(cfg.device),
        "cpu_isa": ops.cpu_isa(),
        "bytes_moved": case.bytes_moved,
        **_throughput(kernel, *work),
        "copy_bw_gb_s": copy_bw_gb_s,
    }
    if gemm_tflop_s:
        record["gemm_tflop_s"] = gemm_tflop_s
    if case.flops is not None:
        record["flops"] = case.flops
    for name in ("reference", "sdpa"):
        if name in timings:
            baseline = _throughput(timings[name], *work)
            baseline["kernel_speedup"] = timings[name].median_ms / kernel.median_ms
            record[name] = baseline
    if case.notes:
        record["notes"] = dict(case.notes)
    return record


def shape_label(params: dict[str, int]) -> str:
    """Compact shape, e.g. 'B=8 C=2048 H=32/8 D=128 S=16'."""
    parts = []
    for name, value in params.items():
        if name == "heads":
            kv = params.get("kv_heads")
            parts.append(f"H={value}/{kv}" if kv is not None else f"H={value}")
        elif name == "kv_heads":
            if "heads" not in params:
                parts.append(f"KVH={value}")
        else:
            parts.append(f"{_SHAPE_KEYS[name]}={value}")
    return " ".join(parts)


_IMPL_NAMES = {"kernel": "sagellm", "reference": "torch ref", "sdpa": "torch sdpa"}
LEGEND = (
    "GB/s (TB/s on a GPU) and GFLOP/s (TFLOP/s) at the median time; 'of copy' = bandwidth / "
    "measured copy bandwidth (above 100%: data served from cache); 'of GEMM' = FLOP rate / "
    "measured bf16 GEMM rate; speedup = baseline time / sagellm time"
)


def _header(gpu: bool) -> tuple[str, ...]:
    bw, fl = ("TB/s", "TFLOP/s") if gpu else ("GB/s", "GFLOP/s")
    return (
        "op",
        "dtype",
        "shape",
        "impl",
        "ms med",
        "ms min",
        bw,
        "of copy",
        fl,
        "of GEMM",
        "speedup",
    )


def _row(
    first: bool, record: dict[str, Any], impl: str, figures: dict[str, Any], gpu: bool
) -> list[str]:
    lead = [record["op"], record["dtype"], shape_label(record["params"])] if first else ["", "", ""]
    scale = 1e-3 if gpu else 1.0
    gflop = figures.get("gflop_s")
    of_gemm = figures.get("fraction_of_gemm")
    speedup = figures.get("kernel_speedup")
    return [
        *lead,
        _IMPL_NAMES[impl],
        f"{figures['time_ms']['median']:.3f}",
        f"{figures['time_ms']['min']:.3f}",
        f"{figures['gb_s'] * scale:.{2 if gpu else 1}f}",
        f"{100 * figures['fraction_of_copy_bw']:.0f}%",
        f"{gflop * scale:.1f}" if gflop is not None else "-",
        f"{100 * of_gemm:.0f}%" if of_gemm is not None else "-",
        f"{speedup:.2f}" if speedup is not None else "",
    ]


def format_table(records: list[dict[str, Any]]) -> str:
    """Aligned text table, one row per implementation (sageLLM kernel, then its baselines)."""
    gpu = any(str(r.get("device", "")).startswith("cuda") for r in records)
    header = _header(gpu)
    rows = [list(header)]
    for record in records:
        rows.append(_row(True, record, "kernel", record, gpu))
        for impl in ("reference", "sdpa"):
            if impl in record:
                rows.append(_row(False, record, impl, record[impl], gpu))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric_from = header.index("ms med")

    def fmt(row: list[str]) -> str:
        cells = [
            cell.rjust(width) if i >= numeric_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows[1:]]
    return "\n".join(lines)


def format_context(context: dict[str, Any]) -> str:
    """One line of where it ran, printed above the table."""
    where = context.get("gpu_name") or context.get("cpu_model") or "unknown CPU"
    copy = f"copy bandwidth {context['copy_bw_gb_s']:.1f} GB/s"
    if "copy_bw_end_gb_s" in context:
        copy += f" (end of run: {context['copy_bw_end_gb_s']:.1f})"
    if "gemm_bf16_tflop_s" in context:
        copy += f", bf16 GEMM {context['gemm_bf16_tflop_s']:.1f} TFLOP/s"
    return (
        f"{where} | {context['device']}, {context['threads']} threads, CPU ISA "
        f"{context['cpu_isa']} | {copy}, {context['copy_buffer_mib']} MiB buffers | "
        f"torch {context['torch_version']}, sagellm {context['sagellm_version']}"
    )


def write_json(
    path: str | Path,
    context: dict[str, Any],
    records: list[dict[str, Any]],
    errors: list[dict[str, Any]] | None = None,
) -> None:
    """{"context": ..., "records": [...]}, plus "errors" when some cases could not run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"context": context, "records": records}
    if errors:
        payload["errors"] = errors
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def print_report(context: dict[str, Any], records: list[dict[str, Any]], file=None) -> None:
    file = file or sys.stdout
    print(format_context(context), file=file)
    if records:
        print(LEGEND, file=file)
        print(format_table(records), file=file)
