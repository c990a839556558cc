"""`sage-llm demo`: workload definitions, exact-length prompts, the aggregation and contract
checks, and an in-process run on a tiny checkpoint writing the metrics JSON and report."""

from __future__ import annotations

import json

import pytest

from sagellm.bench.demo_report import RequestResult, aggregate, check_contract
from sagellm.bench.workloads import WORKLOADS, PromptFactory, select
from sagellm.cli.main import main
from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

METRIC_KEYS = {
    "total_requests", "successful_requests", "failed_requests", "error_rate", "avg_ttft_ms",
    "p50_ttft_ms", "p95_ttft_ms", "p99_ttft_ms", "avg_tbt_ms", "avg_tpot_ms", "avg_throughput_tps",
    "output_throughput_tps", "peak_mem_mb", "total_kv_used_tokens", "total_kv_used_bytes",
    "avg_prefix_hit_rate", "total_evict_count", "total_evict_ms", "total_time_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "cli-tiny-llama"
    if not (folder / "config.json").is_file():
        write_tiny_checkpoint("llama", folder, load_reference_tokenizer())
    return folder


def test_workloads_match_workloads_md():
    y1 = WORKLOADS["year1"]
    assert [(s.prompt_tokens, s.output_tokens, s.requests, s.concurrent) for s in y1.segments] == [
        (128, 128, 5, False),
        (2048, 512, 3, False),
        (256, 256, 10, True),
    ]
    assert y1.kv_budget_tokens == 4096 and y1.contract.ttft_ms == 100
    assert WORKLOADS["year3"].contract.spec_accept_rate == 0.60
    assert [w.name for w in select("all")] == [
        "year1", "year2", "year3", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"
    ]  # fmt: skip
    assert [w.name for w in select("Q5,year2")] == ["q5", "year2"]
    with pytest.raises(ValueError, match="workload = 'year9' is unknown"):
        select("year9")
    half = WORKLOADS["q6"].scaled(0.5).segments[0]
    assert (half.prompt_tokens, half.output_tokens, half.requests) == (256, 128, 5)


def test_prompts_have_exact_lengths_and_are_deterministic():
    tok = load_reference_tokenizer()

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    seg = WORKLOADS["q4"].segments[0]
    a = PromptFactory(encode).segment_prompts("q4", seg)
    b = PromptFactory(encode).segment_prompts("q4", seg)
    assert a == b and len(a) == 3
    assert all(len(p) == 256 for p in a)
    assert a[0][:192] == a[1][:192] == a[2][:192]  # the shared history
    assert a[0][192:] != a[1][192:]
    other = PromptFactory(encode).segment_prompts("q1", WORKLOADS["q1"].segments[0])
    assert all(len(p) == 32 for p in other) and len(set(map(tuple, other))) == 5


def test_aggregate_and_contract():
    ok = [
        RequestResult("s", True, 10, 4, 0.5, ttft_ms=t, tbt_ms=10.0, tpot_ms=12.0,
                      server={"peak_mem_mb": 100.0 + t, "kv_used_tokens": 14, "kv_used_bytes": 28,
                              "prefix_hit_rate": 0.5, "evict_count": 1, "evict_ms": 2.0,
                              "spec_accept_rate": 0.0})
        for t in (10.0, 20.0, 30.0, 40.0)
    ]  # fmt: skip
    bad = RequestResult("s", False, 10, error="UNAVAILABLE: down")
    m = aggregate([*ok, bad], total_time_s=2.0)
    assert m["total_requests"] == 5 and m["failed_requests"] == 1 and m["error_rate"] == 0.2
    assert m["avg_ttft_ms"] == 25.0 and m["p50_ttft_ms"] == 20.0 and m["p99_ttft_ms"] == 40.0
    assert m["avg_throughput_tps"] == 8.0 and m["output_throughput_tps"] == 8.0
    assert m["peak_mem_mb"] == 140.0 and m["total_kv_used_tokens"] == 56
    assert m["total_evict_count"] == 4 and m["avg_prefix_hit_rate"] == 0.5
    assert "avg_spec_accept_rate" not in m  # not measured: absent, not 0
    rows = {r["metric"]: r for r in check_contract(WORKLOADS["year2"].contract, m)}
    assert rows["avg_ttft_ms"]["met"] is True and rows["error_rate"]["met"] is False
    assert rows["avg_prefix_hit_rate"]["met"] is False
    assert rows["peak_mem_mb"]["value"] == pytest.approx(140 / 1024, abs=1e-4)
    spec = {r["metric"]: r for r in check_contract(WORKLOADS["year3"].contract, m)}
    assert spec["avg_spec_accept_rate"] == {
        "threshold": "speculative acceptance > 0.6", "metric": "avg_spec_accept_rate",
        "value": None, "met": None,
    }  # fmt: skip
    # nothing succeeded: no latency figures at all
    assert set(aggregate([bad], 1.0)) == {
        "total_requests", "successful_requests", "failed_requests", "error_rate", "total_time_s"
    }  # fmt: skip


def test_demo_in_process_writes_metrics(tiny_model, tmp_path, capsys):
    out, md = tmp_path / "m.json", tmp_path / "report.md"
    # The tiny checkpoint holds 512 positions: year1's long segment fits at scale 0.15.
    rc = main(["demo", "--workload", "year1", "--model", str(tiny_model), "--scale", "0.15",
               "--output", str(out), "--markdown", str(md), "--num-threads", "1", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(out.read_text())
    assert report["scale"] == 0.15 and report["protocol_version"] == "0.1"
    ctx = report["context"]
    assert ctx["mode"] == "in-process" and ctx["model_name"] == "cli-tiny-llama"
    assert ctx["dtype"] == "float32" and ctx["hardware"]["cpu_isa"]
    assert "paged_attention" in ctx["kernels"]["attention"] and "dense" in ctx["kernels"]["linear"]
    assert {"torch", "sagellm", "transformers"} <= set(ctx["versions"])

    y1 = report["workloads"]["year1"]
    assert set(y1["metrics"]) == METRIC_KEYS
    assert [(s["prompt_tokens"], s["output_tokens"], s["requests"])
            for s in y1["workload"]["segments"]] == [(19, 19, 1), (307, 77, 1), (38, 38, 2)]  # fmt: skip
    m = y1["metrics"]
    assert m["total_requests"] == 4 == m["successful_requests"] and "errors" not in y1
    assert y1["segments"]["stress"]["total_requests"] == 2
    assert 0 < m["p50_ttft_ms"] <= m["p99_ttft_ms"] and m["avg_tbt_ms"] > 0
    # every request held its prompt and forced output in the KV cache
    assert m["total_kv_used_tokens"] >= (19 + 19) + (307 + 77) + 2 * (38 + 38) - 4
    contract = {c["metric"]: c for c in y1["contract"]}
    assert contract["error_rate"]["met"] is True
    assert contract["avg_ttft_ms"]["met"] == (m["avg_ttft_ms"] < 100)
    assert report["summary"]["total_requests"] == 4
    assert "year1 contract: TTFT < 100" in printed and "summary" in printed
    assert md.read_text().startswith("# sageLLM demo report")


def test_demo_prefix_hits_and_failures(tiny_model, tmp_path, capsys):
    common = ["--model", str(tiny_model), "--num-threads", "1", "--quiet"]
    rc = main(["demo", "--workload", "q4", "--scale", "0.5", "--output", str(tmp_path), *common])
    assert rc == 0
    q4 = json.loads((tmp_path / "metrics.json").read_text())["workloads"]["q4"]["metrics"]
    assert q4["total_requests"] == 2 == q4["successful_requests"]
    assert q4["avg_prefix_hit_rate"] > 0.3  # the second turn reuses the shared history

    # q2 at full scale: 512 + 128 tokens exceed the tiny model's 512 positions -> refused.
    out = tmp_path / "q2.json"
    assert main(["demo", "--workload", "q2", "--output", str(out), *common]) == 3
    q2 = json.loads(out.read_text())["workloads"]["q2"]
    assert q2["metrics"]["failed_requests"] == 3 and q2["metrics"]["error_rate"] == 1.0
    assert "avg_ttft_ms" not in q2["metrics"] and "peak_mem_mb" not in q2["metrics"]
    assert "CONTEXT_LENGTH_EXCEEDED" in q2["errors"][0]


def test_demo_errors_are_one_line(capsys, tmp_path):
    assert main(["demo", "--workload", "year7", "--output", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "year7" in err[0]
    assert main(["demo", "--scale", "2", "--output", str(tmp_path / "x.json")]) == 1
    assert "--scale = 2.0" in capsys.readouterr().err
