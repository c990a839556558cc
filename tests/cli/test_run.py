"""`sage-llm run` as a user runs it: a subprocess from the repository root, the default model
(SmolLM2-135M-Instruct GGUF), text on stdout, metrics on stderr, exit 0; failures exit non-zero
with one line and no traceback. Few cases, since each successful run loads the model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import DEFAULT_GGUF, default_gguf_dir

ROOT = Path(__file__).resolve().parents[2]
# Not "What is the capital of France?": there the model's first token is a close call ("The"
# leads "L" by 0.08 nats dense) that rounding the activations to int8, as the default GGUF path
# and llama.cpp both do, tips to "L'Étoile, ..." (llama.cpp answers the same on this file).
QUESTION = "Tell me the capital of France."


def sage_llm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sagellm.cli.main", "run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_failure(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip() == ""
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.fixture(scope="module")
def answer() -> subprocess.CompletedProcess:
    return sage_llm("-p", QUESTION)


def test_answers_with_metrics(answer):
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout
    assert "TTFT" not in answer.stdout  # metrics stay off stdout
    m = re.search(r"TTFT ([\d.]+) ms .*prompt (\d+) tok \| output (\d+) tok", answer.stderr)
    assert m, answer.stderr
    assert float(m[1]) > 0 and int(m[3]) > 0
    assert "finish stop" in answer.stderr  # the chat model ends its answer itself


def test_raw_prompt_exact_token_count(answer):
    r = sage_llm("-p", QUESTION, "--raw", "--max-tokens", "4", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stderr.strip().splitlines()[-1])
    assert metrics["output_tokens"] == 4 and metrics["finish_reason"] == "length"
    assert r.stdout.strip() != ""
    # --raw skips the chat template, so the prompt is much shorter than the chat one.
    chat_prompt = int(re.search(r"prompt (\d+) tok", answer.stderr)[1])
    assert 0 < metrics["prompt_tokens"] < chat_prompt - 10
    assert metrics["ttft_ms"] > 0 and metrics["load_s"] > 0


@pytest.fixture(scope="module")
def missing() -> subprocess.CompletedProcess:
    return sage_llm("-p", "hi", "--model", "/nonexistent")


def test_missing_model_fails_cleanly(missing):
    assert_clean_failure(missing, "/nonexistent")


def test_missing_model_error_is_one_line(missing):
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_truncated_gguf_fails_cleanly(tmp_path):
    src = Path(default_gguf_dir()) / DEFAULT_GGUF
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(2**20))
    r = sage_llm("-p", "hi", "--model", str(bad))
    assert_clean_failure(r, "truncated.gguf")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_temperature_fails_cleanly():
    r = sage_llm("-p", "hi", "--temperature", "5")
    assert_clean_failure(r, "temperature = 5.0", "[0, 2]")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
