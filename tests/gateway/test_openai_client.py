"""The gateway driven by the official `openai` client: chat, completions, streaming, usage, stop
strings, n, seeds, logprobs, concurrency and cancellation mid-stream."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.gateway.conftest import API_KEY, TINY

GREEDY = {"temperature": 0.0}
LONG = {"ignore_eos": True}  # a random tiny model may pick EOS early; these tests want length


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def _completion(client, prompt, **kw):
    return client.completions.create(model=TINY, prompt=prompt, **kw)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [TINY]


def test_chat_answers_with_usage_and_metrics(client):
    r = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        extra_body=LONG,
        **GREEDY,
    )
    assert r.object == "chat.completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 5  # the chat template wraps the message
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    metrics = r.model_extra["metrics"]
    assert metrics["ttft_ms"] > 0 and metrics["kv_used_tokens"] > 0


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_equals_non_stream_and_ends_with_usage(client, kind):
    n_tok = 12
    if kind == "completion":
        call = client.completions.create
        args = dict(model=TINY, prompt="The quick brown fox", max_tokens=n_tok)
    else:
        call = client.chat.completions.create
        args = dict(model=TINY, messages=[{"role": "user", "content": "Tell a story"}])
        args["max_completion_tokens"] = n_tok
    full = call(**args, extra_body=LONG, **GREEDY)
    chunks = list(
        call(**args, stream=True, stream_options={"include_usage": True}, extra_body=LONG, **GREEDY)
    )
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == n_tok
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    if kind == "completion":
        text = "".join(c.choices[0].text for c in body)
        assert text == full.choices[0].text
    else:
        assert body[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in body)
        assert text == full.choices[0].message.content
    assert body[-1].choices[0].finish_reason == "length"
    assert body[-1].model_extra["metrics"]["ttft_ms"] > 0
    assert all(c.choices[0].finish_reason is None for c in body[:-1])


def test_stop_string_cuts_the_text(client):
    base = _completion(client, "Once upon a time", max_tokens=24, extra_body=LONG, **GREEDY)
    text = base.choices[0].text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip())
    r = _completion(
        client, "Once upon a time", max_tokens=24, stop=[stop], extra_body=LONG, **GREEDY
    )
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n2_returns_two_choices(server):
    client = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=20)
    r = _completion(client, "Hello", max_tokens=6, n=2, temperature=1.0, seed=3, extra_body=LONG)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 12
    s = list(
        _completion(
            client,
            "Hello",
            max_tokens=6,
            n=2,
            temperature=1.0,
            seed=3,
            stream=True,
            extra_body=LONG,
        )
    )
    texts = {0: "", 1: ""}
    for chunk in s:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in r.choices}


def test_seed_reproduces_sampling(client):
    def sample(seed):
        r = _completion(
            client, "Numbers:", max_tokens=16, temperature=1.0, seed=seed, extra_body=LONG
        )
        return r.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_logprobs(client):
    r = _completion(client, "Hello there", max_tokens=5, logprobs=2, extra_body=LONG, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        extra_body=LONG,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c.logprob >= max(t.logprob for t in c.top_logprobs) - 1e-4 for c in content)


def test_concurrent_requests_match_sequential(client):
    prompts = [f"Item {i}: the weather is" for i in range(6)]

    def run(p):
        return _completion(client, p, max_tokens=10, extra_body=LONG, **GREEDY).choices[0].text

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def _wait_idle(server, timeout_s=15.0):
    engine = server.engine()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load, stats = engine.load(), engine.stats()
        if load.running == 0 and load.in_flight == 0 and stats["kv_blocks_used"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.load()} {engine.stats()}")


def test_cancel_mid_stream_frees_blocks(client, server, http):
    before = _wait_idle(server)
    stream = _completion(
        client, "Count forever:", max_tokens=400, stream=True, extra_body=LONG, **GREEDY
    )
    for got, _chunk in enumerate(stream, 1):
        if got == 3:
            break
    assert server.engine().stats()["kv_blocks_used"] > 0  # still generating
    stream.close()
    after = _wait_idle(server)
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 400
    text = http.get("/metrics").text
    assert 'sagellm_kv_cache_usage_ratio{engine_id="' in text
    assert f'model="{TINY}"}} 0.0' in text
    # the server still answers
    assert _completion(client, "ok", max_tokens=2, **GREEDY).choices[0].text is not None


def test_wrong_key_is_refused_by_the_client(server):
    bad = openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
