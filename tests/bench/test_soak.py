"""A short soak against a tiny random checkpoint served in this process: clients that stream,
cancel mid-stream and send bad requests; nothing may be lost, leaked or answered wrongly. And
the soak's own checks fail when the engine still holds blocks or a refusal leaks a traceback."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from sagellm.bench import serving, soak
from sagellm.control_plane.handle import EngineLoad
from tests.bench.test_serving import app_factory, tiny_config
from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint


def soak_args(url: str, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    soak.add_arguments(p)
    args = p.parse_args(["--url", url, "--input-len", "8-48", "--output-len", "4-24", *extra])
    args.warmup_s = 1.0
    return args


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-soak") / "tiny-llama"
    ckpt = write_tiny_checkpoint("llama", folder, load_reference_tokenizer())
    with serving.spawned_server(tiny_config(ckpt), app_factory) as srv:
        yield srv


@pytest.fixture(scope="module")
def report(server):
    args = soak_args(server.url, "--clients", "3", "--duration-s", "8")
    args.cancel_share, args.bad_share, args.sample_s = 0.3, 0.3, 2.0
    return asyncio.run(
        soak.soak(
            server.url, args, engine=server.engine(), logged_errors=lambda: server.logged_errors
        )
    )


def test_every_kind_of_request_ran(report):
    o = report["outcomes"]
    assert o.get("completed", 0) > 0 and o.get("cancelled", 0) > 0 and o.get("rejected", 0) > 0
    assert report["requests"] == sum(o.values())


def test_nothing_lost_or_unexpected(report):
    assert report["lost"] == 0
    assert report["unexpected_errors"] == {}, report["unexpected_samples"]


def test_bad_requests_all_4xx(report):
    statuses = report["bad_requests_by_kind_status"]
    assert statuses
    for key in statuses:
        assert 400 <= int(key.rsplit(":", 1)[1]) < 500, key


def test_no_blocks_held_at_end(report):
    assert report["kv_blocks_held_at_end"] == 0
    assert report["end_state"]["in_flight"] == 0
    assert report["end_state"]["gateway_running"] == 0  # admission slots all given back
    assert report["rss_mb"]["after_warmup"] > 0 and report["rss_mb"]["end"] > 0
    assert report["rss_mb"]["kv_blocks_touched_max"] > 0
    # sampled every 2 s (and once at the end of the 1 s warm-up), not in a busy loop
    assert 2 <= len(report["timeline"]) <= 20, len(report["timeline"])


def test_server_logged_no_errors(report):
    assert report["server_errors_logged"] == 0, report["server_error_samples"]


def test_soak_passes(report):
    assert report["passed"], report["failures"]


class LeakyEngine:
    """The real engine's info, but counters that claim two blocks are still held."""

    def __init__(self, engine):
        self.real = engine

    def info(self):
        return self.real.info()

    def load(self):
        return EngineLoad()

    def stats(self):
        return {"kv_blocks_used": 2, "kv_blocks_cached": 0, "kv_usage": 0.01}


def test_held_blocks_fail_the_soak(server):
    args = soak_args(server.url, "--clients", "1", "--duration-s", "0.5", "--settle-s", "0.3")
    rep = asyncio.run(soak.soak(server.url, args, engine=LeakyEngine(server.engine())))
    assert not rep["passed"]
    assert any("KV still held" in f for f in rep["failures"])


def test_http_probe_reads_engine_load(server):
    """Without in-process access the end state comes from /v1/engine/load."""
    args = soak_args(server.url, "--clients", "1", "--duration-s", "0.5")
    rep = asyncio.run(soak.soak(server.url, args))
    assert rep["end_state"] == {"kv_usage": 0.0, "in_flight": 0, "gateway_running": 0}
    assert rep["kv_blocks_held_at_end"] is None and rep["rss_mb"]["growth"] is None


def test_metric_sum():
    text = (
        "# HELP sagellm_engine_running x\n"
        'sagellm_engine_running{engine_id="a",model="m"} 2.0\n'
        'sagellm_engine_running{engine_id="b",model="m"} 3.0\n'
        "sagellm_engine_running_other 7\n"
        "sagellm_queue_depth 1.0\n"
    )
    assert soak.metric_sum(text, "sagellm_engine_running") == 5.0
    assert soak.metric_sum(text, "sagellm_queue_depth") == 1.0
    assert soak.metric_sum(text, "sagellm_kv_cache_usage_ratio") == 0.0


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (400, '{"error": {"message": "bad", "type": "invalid_request_error", "code": 3}}', None),
        (500, '{"error": {"message": "x", "type": "t", "code": 1}}', "expected 4xx"),
        (400, "Traceback (most recent call last):", "traceback"),
        (400, '{"error": {"message": "in /x/sagellm/app.py", "type": "t", "code": 1}}', "path"),
        (404, '{"detail": "Not Found"}', "not an OpenAI error"),
        (400, "not json", "not an OpenAI error"),
    ],
)
def test_check_error_body(status, body, why):
    got = soak.check_error_body(status, body)
    assert got is None if why is None else why in got
