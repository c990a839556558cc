"""`sage-llm serve` / `serve --engine-only` / `gateway` as real processes on loopback: an
OpenAI-client chat through gateway -> engine-only server, the README's curl request against
`serve`, one-line start-up errors, and clean exits on SIGINT / SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import load_reference_tokenizer, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
# The README serves the default model; the tiny checkpoint stands in for it under the same name.
SERVED_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "cli-tiny-llama"
    if not (folder / "config.json").is_file():
        write_tiny_checkpoint("llama", folder, load_reference_tokenizer())
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGELLM_")}
    env["SAGELLM_CONFIG"] = os.devnull  # no user config file in the tests
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


class Server:
    """A `python -m sagellm.cli.main ...` child with its output in a file."""

    def __init__(self, args: list[str], port: int, log: Path, env: dict | None = None):
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sagellm.cli.main", *args, "--port", str(port)],
            cwd=ROOT,
            env=env or cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"server not ready after {timeout} s:\n{self.output()}")

    def wait_output(self, text: str, timeout: float = 10) -> str:
        """The output once it holds `text`: the banner is printed just after the server starts
        answering /health (up to one event-loop poll later), so readiness alone can race it."""
        deadline = time.monotonic() + timeout
        while text not in (out := self.output()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return out

    def signal_and_wait(self, sig: int, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._out.close()


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """An engine-only server and a full `serve`, started together (model loads overlap)."""
    logs = tmp_path_factory.mktemp("serve-logs")
    common = ["--model", str(tiny_model), "--model-name", SERVED_NAME, "--num-threads", "1"]
    engine = Server(
        ["serve", "--engine-only", "--engine-id", "e0", *common], free_port(), logs / "engine.log"
    )
    full = Server(["serve", *common, "--api-key", "sk-test"], free_port(), logs / "serve.log")
    try:
        engine.wait_ready()
        full.wait_ready()
        yield {"engine": engine, "serve": full}
    finally:
        engine.stop()
        full.stop()


def test_engine_only_and_gateway_over_http(servers, tmp_path):
    import openai

    engine = servers["engine"]
    assert f"at {engine.url}/v1" in engine.wait_output(f"at {engine.url}/v1")  # start-up line
    info = httpx.get(f"{engine.url}/v1/engine/info", timeout=10).json()
    assert info["engine_id"] == "e0" and info["model"] == SERVED_NAME

    gw = Server(
        ["gateway", "--engines", engine.url, "--routing", "round_robin"],
        free_port(),
        tmp_path / "gateway.log",
    )
    try:
        gw.wait_ready(60)
        banner = f"gateway at {gw.url}/v1 -> {engine.url}"
        assert banner in gw.wait_output(banner)
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", timeout=60)
        assert [m.id for m in client.models.list().data] == [SERVED_NAME]
        chat = client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": "Say hello"}],
            max_tokens=8,
            temperature=0,
        )
        assert chat.choices[0].finish_reason == "length"
        assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].message.content
        assert chat.usage.completion_tokens == 8
        stream = client.completions.create(
            model=SERVED_NAME, prompt="Once upon a time", max_tokens=6, stream=True
        )
        text = "".join(c.choices[0].text for c in stream if c.choices)
        assert text
        # The gateway drains and exits 0 on SIGTERM; the engine-only server keeps serving.
        assert gw.signal_and_wait(signal.SIGTERM) == 0
        assert httpx.get(f"{engine.url}/health", timeout=5).status_code == 200
    finally:
        gw.stop()


def readme_curl_request() -> tuple[str, dict, dict]:
    """The README's curl example: (path, headers, JSON body)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"curl (http://127\.0\.0\.1:8000(/v1/\S+))(.*?)-d '(\{.*?\})'", readme, re.S)
    assert m, "README.md has no `curl http://127.0.0.1:8000/v1/... -d '{...}'` example"
    headers = dict(re.findall(r"-H ['\"]([^:'\"]+):\s*([^'\"]+)['\"]", m.group(3)))
    return m.group(2), headers, json.loads(m.group(4))


def test_readme_curl_example_against_serve(servers):
    serve = servers["serve"]
    path, headers, body = readme_curl_request()
    assert body["model"] == SERVED_NAME
    # The README's example runs without a key; this server requires one, so add it.
    r = httpx.post(f"{serve.url}{path}", json=body, timeout=60)
    assert r.status_code == 401, r.text
    headers["Authorization"] = "Bearer sk-test"
    r = httpx.post(f"{serve.url}{path}", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"]
    assert out["metrics"]["ttft_ms"] > 0


def test_demo_against_a_running_server(servers, tiny_model, tmp_path):
    import json as _json

    out = tmp_path / "url.json"
    r = run_cli(
        "demo", "--url", servers["serve"].url, "--api-key", "sk-test", "--model", str(tiny_model),
        "--workload", "q1,q5", "--scale", "0.4", "--output", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = _json.loads(out.read_text())
    assert report["context"]["mode"] == "url" and report["context"]["model_name"] == SERVED_NAME
    q5 = report["workloads"]["q5"]["metrics"]
    assert q5["total_requests"] == 4 == q5["successful_requests"]
    assert q5["avg_ttft_ms"] > 0 and q5["avg_tbt_ms"] > 0
    assert q5["peak_mem_mb"] > 0  # the server's metrics rode on the last stream chunk


def test_sigint_and_sigterm_exit_cleanly(servers):
    serve, engine = servers["serve"], servers["engine"]
    assert serve.signal_and_wait(signal.SIGINT) == 0, serve.output()
    assert engine.signal_and_wait(signal.SIGTERM) == 0, engine.output()
    for s in (serve, engine):
        assert "Traceback" not in s.output()


def run_cli(*args: str, env: dict | None = None, timeout: float = 90):
    return subprocess.run(
        [sys.executable, "-m", "sagellm.cli.main", *args],
        cwd=ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["serve", "--model", "/no/such/model", "--port", "65000"], {}, "/no/such/model"),
        (["serve"], {"SAGELLM_PORT": "eighty"}, "SAGELLM_PORT"),
        (["serve", "--engine-kind", "nope", "--port", "65000"], {}, "nope"),
        (["gateway", "--port", "65000"], {}, "--engines"),
    ],
)
def test_startup_errors_are_one_line(args, env, expected):
    r = run_cli(*args, env=cli_env(**env))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr
