"""The open-loop serving benchmark against a tiny random checkpoint served in this process:
every request completes with the asked number of tokens, the latency figures are measured
(positive, ordered), and failures (a wrong API key) are counted by status, not hidden."""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import numpy as np
import pytest

from sagellm.bench import serving
from sagellm.control_plane.config import EngineConfig
from sagellm.gateway import GatewaySettings, create_app
from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

API_KEY = "bench-key"


def app_factory(manager, api_key):
    return create_app(manager, GatewaySettings(api_key=api_key, engine_routes=True))


def tiny_config(checkpoint) -> EngineConfig:
    return EngineConfig(
        model=str(checkpoint),
        model_name="tiny-llama",
        max_num_seqs=16,
        kv_cache_memory_gb=0.05,
        num_threads=1,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-serving") / "tiny-llama"
    ckpt = write_tiny_checkpoint("llama", folder, load_reference_tokenizer())
    with serving.spawned_server(tiny_config(ckpt), app_factory, api_key=API_KEY) as srv:
        yield srv


def test_benchmark_measures_every_request(server):
    report = asyncio.run(
        serving.run_benchmark(
            server.url,
            rate=16.0,
            num_requests=8,
            input_len=(8, 40),
            output_len=(4, 12),
            seed=3,
            api_key=API_KEY,
        )
    )
    res = report["results"]
    assert res["errors"] == 0, res["error_samples"]
    assert res["completed"] == 8
    assert res["short_outputs"] == 0  # ignore_eos: exactly max_tokens each
    expected = sum(r["expected_tokens"] for r in report["per_request"])
    assert res["output_tokens"] == expected
    for metric in ("ttft", "tbt", "e2e"):
        s = res[metric]
        assert 0 < s["p50_ms"] <= s["p99_ms"], (metric, s)
        assert s["mean_ms"] > 0
    assert res["ttft"]["count"] == 8
    assert res["e2e"]["p99_ms"] >= res["ttft"]["p99_ms"]
    assert res["request_throughput_rps"] > 0 and res["output_tok_s"] > 0
    assert report["config"]["model"] == "tiny-llama"
    assert report["server"]["models"]["data"][0]["id"] == "tiny-llama"
    assert report["server"]["engine"]["max_num_seqs"] == 16
    assert len(report["machine"]["load_average"]) == 3
    json.dumps(report)  # the report is plain JSON


def test_cli_writes_json_and_counts_refusals(server, tmp_path, capsys):
    out = tmp_path / "serving.json"
    argv = ["--url", server.url, "--rate", "inf", "--num-requests", "3", "--input-len", "8-16"]
    argv += ["--output-len", "4", "--api-key", API_KEY, "--output", str(out)]
    assert serving.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["rate_rps"] == "inf"
    assert report["results"]["completed"] == 3
    assert report["results"]["output_tokens"] == 12
    table = capsys.readouterr().out
    assert f"{server.url} (external)" in table and "TTFT" in table

    argv[argv.index(API_KEY)] = "wrong-key"
    assert serving.main(argv[:-2]) == 1
    assert "errors 3 {'401': 3}" in capsys.readouterr().out


def test_spawn_without_gateway_is_a_clear_error():
    args = argparse.Namespace(
        spawn_model="default", url=None, rate=1.0, num_requests=1, input_len="4", output_len="4"
    )
    args.seed, args.model, args.api_key, args.output = 0, None, None, None
    with pytest.raises(SystemExit, match="needs the gateway"):
        serving.run(args, app_factory=None)


@pytest.mark.parametrize("bad", ["0-4", "9-3", "x", "4-", ""])
def test_bad_length_range(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="--input-len"):
        serving.parse_range(bad, "--input-len")


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 99, 100):
            assert serving.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert serving.percentile([], 50) is None


def test_synthetic_prompt_length():
    tok = load_reference_tokenizer()
    text = serving.synthetic_prompt(random.Random(1), 200)
    n = len(tok(text)["input_ids"])
    assert 180 <= n <= 240, n
