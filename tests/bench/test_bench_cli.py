"""The op microbenchmark CLI: every op runs end to end, the JSON holds measured figures, sweeps
expand to their cartesian product, and bad arguments end with an argparse error, not a traceback.
Speed is never asserted (the machine is shared); shapes are tiny so the file runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from sagellm.bench import report
from sagellm.bench.cli import add_arguments, main, run
from sagellm.bench.op_cases import (
    OPS,
    CaseConfig,
    build_paged_attention_decode,
    build_paged_attention_prefill,
    case_params,
)
from sagellm.bench.timing import AUTO_BUDGET_S, AUTO_MIN_ITERS, gemm_tflops, time_callable

# Tiny shapes: every op reads only the flags it knows.
TINY = [
    "--batch", "2", "--context", "40", "--tokens", "5", "--heads", "4", "--kv-heads", "2",
    "--head-size", "64", "--block-size", "16", "--hidden", "64",
]  # fmt: skip
FAST = ["--warmup", "1", "--iters", "2", "--copy-mib", "8", "--threads", "1"]
ATTENTION = ("paged_attention_decode", "paged_attention_prefill")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def _run(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["op", *args, *FAST, "--output", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_writes_measured_figures(op, tmp_path, capsys):
    result = _run(tmp_path, op, *TINY)
    (record,) = result["records"]
    assert record["op"] == op and record["dtype"] == "bf16" and record["device"] == "cpu"
    assert set(record["params"]) == set(OPS[op].defaults)
    for key in ("gb_s", "fraction_of_copy_bw", "copy_bw_gb_s", "bytes_moved"):
        assert _positive(record[key]), key
    assert _positive(record["time_ms"]["median"]) and _positive(record["time_ms"]["min"])
    assert record["time_ms"]["min"] <= record["time_ms"]["median"]
    baselines = ["reference", "sdpa"] if op in ATTENTION else ["reference"]
    for name in baselines:
        for key in ("gb_s", "fraction_of_copy_bw", "kernel_speedup"):
            assert _positive(record[name][key]), (name, key)
        assert _positive(record[name]["time_ms"]["median"])
    if op in ATTENTION:
        assert _positive(record["gflop_s"]) and _positive(record["sdpa"]["gflop_s"])
        # Against the bf16 GEMM rate measured in the same run.
        gemm = result["context"]["gemm_bf16_tflop_s"]
        assert _positive(gemm) and record["gemm_tflop_s"] == gemm
        assert record["fraction_of_gemm"] == pytest.approx(record["gflop_s"] / (gemm * 1e3))
        assert _positive(record["sdpa"]["fraction_of_gemm"])
    else:
        # Not measured, so absent: no FLOP count for elementwise ops, no SDPA baseline.
        assert "gflop_s" not in record and "sdpa" not in record

    context = result["context"]
    for key in ("timestamp", "sagellm_version", "torch_version", "cpu_isa"):
        assert context[key], key
    assert context["threads"] == 1 and _positive(context["copy_bw_gb_s"])
    assert _positive(context["copy_bw_end_gb_s"])
    assert context["build"]["cpu_isa"] == context["cpu_isa"]

    table = capsys.readouterr().out
    assert op in table and "sagellm" in table and "torch ref" in table


def test_sweep_is_the_cartesian_product(tmp_path, capsys):
    result = _run(
        tmp_path, "rms_norm", "--dtype", "bf16,fp32", "--tokens", "1,3",
        "--hidden", "8,16,24", "--no-reference", "--context", "99",
    )  # fmt: skip
    records = result["records"]
    seen = {(r["dtype"], r["params"]["tokens"], r["params"]["hidden"]) for r in records}
    assert len(records) == 12 and len(seen) == 12
    assert all("reference" not in r for r in records)
    assert "does not use --context" in capsys.readouterr().err


def test_all_runs_every_op_once(tmp_path):
    result = _run(tmp_path, "all", *TINY, "--no-reference")
    assert [r["op"] for r in result["records"]] == list(OPS)


def test_threads_are_restored(tmp_path):
    before = torch.get_num_threads()
    _run(tmp_path, "silu_and_mul", "--tokens", "2", "--hidden", "16")
    assert torch.get_num_threads() == before


def test_mounts_under_a_top_level_cli(tmp_path):
    """The contract with `sage-llm`: add_arguments on its `bench` parser, then run(args)."""
    top = argparse.ArgumentParser(prog="sage-llm")
    bench = top.add_subparsers(dest="command", required=True).add_parser("bench")
    add_arguments(bench)
    out = tmp_path / "bench.json"
    args = top.parse_args(
        [
            "bench",
            "op",
            "silu_and_mul",
            "--tokens",
            "2",
            "--hidden",
            "16",
            *FAST,
            "--output",
            str(out),
        ]
    )
    assert run(args) == 0
    assert json.loads(out.read_text())["records"][0]["op"] == "silu_and_mul"


def test_a_case_the_kernel_rejects_is_reported_not_raised(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["op", "paged_attention_decode", *TINY, "--head-size", "72", *FAST, "--output", str(out)]
    assert main(argv) == 1
    (error,) = json.loads(out.read_text())["errors"]
    assert error["params"]["head_size"] == 72 and "head_size" in error["error"]
    assert "error: paged_attention_decode" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown op 'nope'"),
        (["rms_norm", "--dtype", "bf16,int8"], "unknown dtype 'int8'"),
        (["rms_norm", "--tokens", "4,x"], "'x' is not an integer"),
        (["rms_norm", "--hidden", "0"], "0 must be at least 1"),
        (["paged_attention_decode", "--heads", "6", "--kv-heads", "4"], "--kv-heads 4"),
        (["paged_attention_prefill", "--context", "8", "--tokens", "9"], "--tokens 9 exceeds"),
        (["rms_norm", "--iters", "0"], "--iters"),
    ],
)
def test_bad_arguments_exit_like_argparse(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["op", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err and "Traceback" not in err


def _cfg(op: str, **params: int) -> CaseConfig:
    return CaseConfig(op, torch.float32, torch.device("cpu"), params)


def test_attention_work_counts():
    shape = {"batch": 2, "context": 40, "heads": 4, "kv_heads": 2, "head_size": 64}
    decode = build_paged_attention_decode(_cfg("paged_attention_decode", **shape, block_size=16))
    kv, q_out, meta = 2 * 2 * 40 * 2 * 64 * 4, 2 * 2 * 4 * 64 * 4, 4 * 2 * (3 + 1)
    assert decode.bytes_moved == kv + q_out + meta
    assert decode.flops == 4 * 4 * 64 * (2 * 40)

    prefill = build_paged_attention_prefill(
        _cfg("paged_attention_prefill", **shape, block_size=16, tokens=3)
    )
    # The 3 new tokens sit at positions 37, 38, 39 and see 38 + 39 + 40 keys.
    assert prefill.flops == 4 * 4 * 64 * 2 * (38 + 39 + 40)
    assert prefill.bytes_moved == kv + 2 * 2 * 3 * 4 * 64 * 4 + 4 * 2 * 4 + 4 * 3


@pytest.mark.parametrize("tokens", [3, 40])
def test_sdpa_baseline_computes_the_same_attention(tokens):
    """The SDPA baseline must do the op's work: same K/V, causal mask aligned bottom-right."""
    shape = {"batch": 2, "context": 40, "heads": 4, "kv_heads": 2, "head_size": 64}
    case = build_paged_attention_prefill(
        _cfg("paged_attention_prefill", **shape, block_size=16, tokens=tokens)
    )
    sdpa = case.sdpa().transpose(1, 2).reshape(2 * tokens, 4, 64)
    torch.testing.assert_close(sdpa, case.reference().to(sdpa.dtype), atol=1e-5, rtol=1e-5)

    decode = build_paged_attention_decode(_cfg("paged_attention_decode", **shape, block_size=16))
    sdpa = decode.sdpa().squeeze(2)
    torch.testing.assert_close(sdpa, decode.reference().to(sdpa.dtype), atol=1e-5, rtol=1e-5)


def test_timer_counts_calls_and_measures_time():
    calls = []
    cpu = torch.device("cpu")
    timing = time_callable(lambda: calls.append(1), cpu, warmup=3, iters=4)
    assert len(calls) == 3 + 4 and timing.iters == 4
    assert 0 < timing.min_ms <= timing.median_ms

    # Auto mode: about AUTO_BUDGET_S of calls, within [AUTO_MIN_ITERS, AUTO_MAX_ITERS].
    timing = time_callable(lambda: time.sleep(0.02), cpu, warmup=1, iters=None)
    assert AUTO_MIN_ITERS <= timing.iters <= int(AUTO_BUDGET_S / 0.02)
    assert timing.min_ms >= 20


def test_cuda_defaults_only_override_known_parameters():
    for op, spec in OPS.items():
        assert set(spec.cuda_defaults) <= set(spec.defaults), op
        assert set(case_params(op, {}, "cuda")) == set(spec.defaults)
    decode = case_params("paged_attention_decode", {}, "cuda")
    assert (decode["batch"], decode["context"], decode["heads"], decode["kv_heads"]) == (
        64,
        2048,
        32,
        8,
    )
    prefill = case_params("paged_attention_prefill", {"context": 2048}, "cuda")
    assert prefill["tokens"] == 2048  # a whole prompt unless --tokens says otherwise
    assert case_params("rms_norm", {"tokens": 7}, "cuda")["tokens"] == 7


def test_gpu_tables_use_tb_s_and_show_the_gemm_fraction():
    figures = {"time_ms": {"median": 0.5, "min": 0.4}, "gb_s": 3000.0, "fraction_of_copy_bw": 0.9}
    record = {
        "op": "paged_attention_prefill",
        "dtype": "bf16",
        "device": "cuda",
        "params": {"batch": 1, "context": 4096},
        **figures,
        "gflop_s": 500_000.0,
        "fraction_of_gemm": 0.6,
        "sdpa": {**figures, "kernel_speedup": 1.25},
    }
    table = report.format_table([record])
    header, _, kernel, sdpa = table.splitlines()
    assert "TB/s" in header and "TFLOP/s" in header and "of GEMM" in header
    assert kernel.split()[-6:] == ["0.500", "0.400", "3.00", "90%", "500.0", "60%"]
    assert sdpa.split()[-7:] == ["0.500", "0.400", "3.00", "90%", "-", "-", "1.25"]


def test_gemm_rate_is_measured():
    assert _positive(gemm_tflops(torch.device("cpu"), torch.float32, n=64, repeats=2))
    with pytest.raises(ValueError, match="GEMM size 0"):
        gemm_tflops(torch.device("cpu"), n=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tokens", [3, 64])
def test_cuda_sdpa_baseline_is_fused_and_computes_the_same_attention(tokens):
    """On a GPU the SDPA baseline must run a fused backend (flash, efficient or cuDNN; never the
    math one) and still do the op's work: bottom-right causal mask, GQA."""
    shape = {"batch": 2, "context": 64, "heads": 8, "kv_heads": 2, "head_size": 64}
    cfg = CaseConfig(
        "paged_attention_prefill",
        torch.bfloat16,
        torch.device("cuda"),
        {**shape, "block_size": 16, "tokens": tokens},
    )
    case = build_paged_attention_prefill(cfg)
    assert case.notes["sdpa_backend"] in (
        "flash_attention",
        "efficient_attention",
        "cudnn_attention",
    )
    sdpa = case.sdpa().transpose(1, 2).reshape(2 * tokens, 8, 64).float()
    torch.testing.assert_close(sdpa, case.reference().float(), atol=2e-2, rtol=2e-2)

    decode = build_paged_attention_decode(
        CaseConfig(
            "paged_attention_decode",
            torch.bfloat16,
            torch.device("cuda"),
            {**shape, "block_size": 16},
        )
    )
    assert decode.notes["sdpa_backend"] != "math"
    sdpa = decode.sdpa().squeeze(2).float()
    torch.testing.assert_close(sdpa, decode.reference().float(), atol=2e-2, rtol=2e-2)
