"""Raw HTTP against the gateway: auth, every class of bad input, size limits, /health, /metrics.
Every error is an OpenAI error object without a traceback or a server path, and the server keeps
answering afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import sagellm
from tests.gateway.conftest import API_KEY, TINY

GOOD = {"model": TINY, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
CHAT = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _check_error(r: httpx.Response, status: int, code: str, server, param: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]
    if param is not None:
        assert err["param"] == param
    text = r.text
    assert "Traceback" not in text and 'File "' not in text
    for path in (str(server.checkpoint), str(Path(sagellm.__file__).parent), "/tmp/", "/root/"):
        assert path not in text
    return err


def test_auth(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        _check_error(c.get("/v1/models"), 401, "UNAUTHENTICATED", server)
        r = c.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer wrong"})
        _check_error(r, 401, "UNAUTHENTICATED", server)
        r = c.post("/v1/completions", json=GOOD, headers={"Authorization": API_KEY})
        _check_error(r, 401, "UNAUTHENTICATED", server)
        r = c.post("/v1/completions", json=GOOD, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        assert c.get("/health").status_code == 200  # probes stay open


BAD_COMPLETIONS = [
    ('{"model": "tiny-llama", "prompt": ', "INVALID_ARGUMENT", None),
    ("", "INVALID_ARGUMENT", None),
    ("[1, 2]", "INVALID_ARGUMENT", None),
    ({**GOOD, "max_tokens": "10"}, "INVALID_ARGUMENT", "max_tokens"),
    ({**GOOD, "max_tokens": 2.5}, "INVALID_ARGUMENT", "max_tokens"),
    ({**GOOD, "temperature": "hot"}, "INVALID_ARGUMENT", "temperature"),
    ({**GOOD, "stream": "yes"}, "INVALID_ARGUMENT", "stream"),
    ({**GOOD, "prompt": 42}, "INVALID_ARGUMENT", None),
    ({**GOOD, "temperature": 2.5}, "INVALID_ARGUMENT", "temperature"),
    ({**GOOD, "temperature": -0.1}, "INVALID_ARGUMENT", "temperature"),
    ({**GOOD, "top_p": 0}, "INVALID_ARGUMENT", "top_p"),
    ({**GOOD, "top_p": 1.5}, "INVALID_ARGUMENT", "top_p"),
    ({**GOOD, "max_tokens": 0}, "INVALID_ARGUMENT", "max_tokens"),
    ({**GOOD, "max_tokens": -5}, "INVALID_ARGUMENT", "max_tokens"),
    ({**GOOD, "n": 0}, "INVALID_ARGUMENT", "n"),
    ({**GOOD, "logprobs": 50}, "INVALID_ARGUMENT", "logprobs"),
    ({**GOOD, "presence_penalty": 3}, "INVALID_ARGUMENT", "presence_penalty"),
    ({**GOOD, "prompt": [1, -3]}, "INVALID_ARGUMENT", None),
    ({**GOOD, "prompt": [10**9]}, "INVALID_ARGUMENT", None),
    ({**GOOD, "prompt": ""}, "INVALID_ARGUMENT", None),
]


@pytest.mark.parametrize("body,code,param", BAD_COMPLETIONS)
def test_bad_completion_input_is_400(http, server, body, code, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    _check_error(r, 400, code, server, param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({**CHAT, "messages": "hi"}, "messages"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({**CHAT, "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({**CHAT, "tools": [{"type": "function"}]}, None),
    ],
)
def test_bad_chat_input_is_400(http, server, body, param):
    _check_error(
        http.post("/v1/chat/completions", json=body), 400, "INVALID_ARGUMENT", server, param
    )


def test_prompt_over_the_context_is_400(http, server):
    long_prompt = "hello " * 700  # the tiny model allows 512 tokens
    r = http.post("/v1/completions", json={**GOOD, "prompt": long_prompt})
    err = _check_error(r, 400, "CONTEXT_LENGTH_EXCEEDED", server)
    assert "512" in err["message"]
    chat = {**CHAT, "messages": [{"role": "user", "content": long_prompt}]}
    del chat["max_tokens"]
    r = http.post("/v1/chat/completions", json=chat)
    _check_error(r, 400, "CONTEXT_LENGTH_EXCEEDED", server)
    r = http.post("/v1/completions", json={**GOOD, "prompt": "hi", "max_tokens": 600})
    _check_error(r, 400, "CONTEXT_LENGTH_EXCEEDED", server)


def test_unknown_model_is_404(http, server):
    r = http.post("/v1/completions", json={**GOOD, "model": "gpt-17"})
    err = _check_error(r, 404, "MODEL_NOT_FOUND", server, "model")
    assert "gpt-17" in err["message"] and TINY in err["message"]
    _check_error(
        http.post("/v1/chat/completions", json={**CHAT, "model": "x"}),
        404,
        "MODEL_NOT_FOUND",
        server,
    )


def test_body_over_the_limit_is_413(http, server):
    big = {**GOOD, "prompt": "x" * (100 * 1024)}
    _check_error(http.post("/v1/completions", json=big), 413, "PAYLOAD_TOO_LARGE", server)

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(100):
            yield b" " * 1024

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    _check_error(r, 413, "PAYLOAD_TOO_LARGE", server)


def test_unknown_route_is_an_openai_error(http, server):
    _check_error(http.get("/v1/nothing"), 404, "INVALID_ARGUMENT", server)


def test_server_still_answers_after_bad_input(http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_health_and_metrics(http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["engines"][0]["model"] == TINY
    assert h["engines"][0]["state"] == "READY"
    http.post("/v1/completions", json=GOOD)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        'sagellm_requests_total{path="/v1/completions",status="200"}',
        "sagellm_prompt_tokens_total",
        "sagellm_generation_tokens_total",
        "sagellm_time_to_first_token_seconds_bucket",
        "sagellm_time_between_tokens_seconds_bucket",
        "sagellm_request_duration_seconds_bucket",
        "sagellm_queue_depth 0.0",
        "sagellm_requests_running",
        "sagellm_kv_cache_usage_ratio",
        "sagellm_prefix_cache_hit_rate",
        "sagellm_engine_running",
        f'sagellm_engine_up{{engine_id="{h["engines"][0]["engine_id"]}",model="{TINY}"}} 1.0',
    ):
        assert name in text, name
    gen = [ln for ln in text.splitlines() if ln.startswith("sagellm_generation_tokens_total ")]
    assert float(gen[0].split()[1]) >= 2
