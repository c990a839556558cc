"""Aggregating the demo's per-request measurements into the Protocol v0.1 metrics of
WORKLOADS.md, checking the year contracts, and rendering the table and the Markdown report.

A field that was not measured is left out, never filled with 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sagellm.bench.workloads import Contract


@dataclass
class RequestResult:
    segment: str
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    e2e_s: float = 0.0
    ttft_ms: float | None = None
    tbt_ms: float | None = None  # mean gap between streamed tokens, as the client saw them
    tpot_ms: float | None = None  # (last token - first token) / (tokens - 1)
    server: dict | None = None  # the engine's protocol Metrics of the request, when sent
    error: str | None = None


@dataclass
class WorkloadRun:
    results: list[RequestResult] = field(default_factory=list)
    total_time_s: float = 0.0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    # nearest rank, so p99 of few samples is the worst one rather than an interpolation
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def aggregate(results: list[RequestResult], total_time_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out: dict = {
        "total_requests": len(results),
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "error_rate": round((len(results) - len(ok)) / len(results), 6) if results else 0.0,
    }
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    if ttft:
        out["avg_ttft_ms"] = _mean(ttft)
        for q in (50, 95, 99):
            out[f"p{q}_ttft_ms"] = _pct(ttft, q)
    tbt = [r.tbt_ms for r in ok if r.tbt_ms is not None]
    if tbt:
        out["avg_tbt_ms"] = _mean(tbt)
    tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    if tpot:
        out["avg_tpot_ms"] = _mean(tpot)
    tps = [r.output_tokens / r.e2e_s for r in ok if r.e2e_s > 0 and r.output_tokens]
    if tps:
        out["avg_throughput_tps"] = _mean(tps)
    if ok and total_time_s > 0:
        out["output_throughput_tps"] = sum(r.output_tokens for r in ok) / total_time_s
    server = [r.server for r in ok if r.server]
    if server:
        peak = [m["peak_mem_mb"] for m in server if m.get("peak_mem_mb")]
        if peak:
            out["peak_mem_mb"] = max(peak)
        out["total_kv_used_tokens"] = sum(int(m.get("kv_used_tokens", 0)) for m in server)
        out["total_kv_used_bytes"] = sum(int(m.get("kv_used_bytes", 0)) for m in server)
        out["avg_prefix_hit_rate"] = _mean([float(m.get("prefix_hit_rate", 0.0)) for m in server])
        out["total_evict_count"] = sum(int(m.get("evict_count", 0)) for m in server)
        out["total_evict_ms"] = sum(float(m.get("evict_ms", 0.0)) for m in server)
        # Only an engine that decodes speculatively measures acceptance; ours reports it when > 0.
        spec = [float(m["spec_accept_rate"]) for m in server if m.get("spec_accept_rate")]
        if spec:
            out["avg_spec_accept_rate"] = _mean(spec)
    out["total_time_s"] = total_time_s
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def check_contract(contract: Contract, m: dict) -> list[dict]:
    """Each threshold: the figure it is judged on, the value, and met / not met (None when the
    figure was not measured)."""
    rows = [
        ("TTFT", "avg_ttft_ms", "<", contract.ttft_ms, 1.0),
        ("TBT", "avg_tbt_ms", "<", contract.tbt_ms, 1.0),
        ("TPOT", "avg_tpot_ms", "<", contract.tbt_ms, 1.0),
        ("throughput", "output_throughput_tps", ">", contract.throughput_tps, 1.0),
        ("error rate", "error_rate", "<", contract.error_rate, 1.0),
        ("peak memory (GB)", "peak_mem_mb", "<", contract.peak_mem_gb, 1 / 1024),
    ]
    if contract.prefix_hit_rate is not None:
        rows.append(("prefix hit rate", "avg_prefix_hit_rate", ">", contract.prefix_hit_rate, 1.0))
    if contract.spec_accept_rate is not None:
        rows.append(
            ("speculative acceptance", "avg_spec_accept_rate", ">", contract.spec_accept_rate, 1.0)
        )
    out = []
    for label, key, op, limit, factor in rows:
        value = m.get(key)
        v = value * factor if value is not None else None
        met = None if v is None else (v < limit if op == "<" else v > limit)
        out.append(
            {
                "threshold": f"{label} {op} {limit:g}",
                "metric": key,
                "value": round(v, 4) if v is not None else None,
                "met": met,
            }
        )
    return out


_COLS = [
    ("workload", None, "{}"),
    ("ok/total", None, "{}"),
    ("TTFT avg ms", "avg_ttft_ms", "{:.1f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("TBT ms", "avg_tbt_ms", "{:.1f}"),
    ("TPOT ms", "avg_tpot_ms", "{:.1f}"),
    ("req tok/s", "avg_throughput_tps", "{:.1f}"),
    ("out tok/s", "output_throughput_tps", "{:.1f}"),
    ("peak MiB", "peak_mem_mb", "{:.0f}"),
    ("prefix hit", "avg_prefix_hit_rate", "{:.2f}"),
    ("time s", "total_time_s", "{:.1f}"),
]


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    items = [*report["workloads"].items(), ("summary", {"metrics": report["summary"]})]
    for name, w in items:
        m = w["metrics"]
        row = [name, f"{m['successful_requests']}/{m['total_requests']}"]
        for _, key, fmt in _COLS[2:]:
            row.append(fmt.format(m[key]) if key in m else "-")
        rows.append(row)
    return rows


def contract_lines(report: dict) -> list[str]:
    lines = []
    for name, w in report["workloads"].items():
        for c in w.get("contract", []):
            state = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]
            value = "-" if c["value"] is None else f"{c['value']:g}"
            lines.append(f"{name} contract: {c['threshold']}: {value} -> {state}")
    return lines


def render_table(report: dict) -> str:
    header = [c[0] for c in _COLS]
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(
        [fmt.format(*header), *(fmt.format(*r) for r in rows), *contract_lines(report)]
    )


def render_markdown(report: dict) -> str:
    ctx = report["context"]
    hw = ctx.get("hardware", {})
    lines = [
        "# sageLLM demo report",
        "",
        f"- model: {ctx.get('model')} (served as {ctx.get('model_name')}), dtype {ctx.get('dtype')}",
        f"- mode: {ctx.get('mode')}{' ' + ctx['url'] if ctx.get('url') else ''}; "
        f"scale {report['scale']:g}",
        f"- hardware: {hw.get('cpu_model', '?')} ({hw.get('cpu_isa', '?')}, "
        f"{hw.get('cpu_cores', '?')} cores)" + (f", GPU {hw['gpu']}" if hw.get("gpu") else ""),
        f"- kernels: {ctx.get('kernels', {})}",
        f"- versions: {ctx.get('versions', {})}",
        f"- generated: {report['generated_at']}",
        "",
        "| " + " | ".join(c[0] for c in _COLS) + " |",
        "|" + "---|" * len(_COLS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    contracts = contract_lines(report)
    if contracts:
        lines += ["", "## Contracts", ""] + [f"- {c}" for c in contracts]
    return "\n".join(lines) + "\n"
