"""Protocol v0.1 types: validation ranges, JSON round trips, the stream-event union, error codes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sagellm.protocol import (
    HTTP_STATUS,
    Error,
    ErrorCode,
    Metrics,
    ProtocolError,
    Request,
    Response,
    StreamDelta,
    StreamEnd,
    StreamStart,
    Usage,
    parse_stream_event,
)


def test_request_defaults_and_round_trip():
    r = Request(model="m", prompt="hi", max_tokens=4)
    assert r.request_id.startswith("req-") and r.trace_id and r.temperature == 0.0
    assert Request.model_validate_json(r.model_dump_json()) == r
    assert Request(model="m", prompt=[1, 2, 3], max_tokens=1).prompt == [1, 2, 3]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("kv_budget_tokens", 0),
        ("n", 0),
        ("logprobs", 21),
        ("presence_penalty", 3.0),
        ("prompt", [1, -2]),
        ("unknown_field", 1),
    ],
)
def test_request_rejects_out_of_range(field, value):
    body = {"model": "m", "prompt": "x", "max_tokens": 4, field: value}
    with pytest.raises(ValidationError):
        Request.model_validate(body)


def test_metrics_ranges():
    Metrics(prefix_hit_rate=1.0, error_rate=0.0)
    for bad in ({"prefix_hit_rate": 1.5}, {"ttft_ms": -1}, {"error_rate": 2}):
        with pytest.raises(ValidationError):
            Metrics(**bad)


def test_response_and_stream_events_round_trip():
    m = Metrics(ttft_ms=12.5, tbt_ms=3.0, kv_used_tokens=40)
    resp = Response(
        request_id="a",
        trace_id="t",
        output_text="Paris",
        output_tokens=[1, 2],
        finish_reason="stop",
        metrics=m,
        usage=Usage(prompt_tokens=5, completion_tokens=2),
    )
    assert Response.model_validate_json(resp.model_dump_json()) == resp
    assert resp.usage.total_tokens == 7
    events = [
        StreamStart(request_id="a", trace_id="t", engine_id="e0", prompt_tokens=5),
        StreamDelta(request_id="a", trace_id="t", engine_id="e0", chunk="Par", chunk_tokens=[1]),
        StreamEnd(request_id="a", trace_id="t", engine_id="e0", finish_reason="length", metrics=m),
    ]
    for ev in events:
        back = parse_stream_event(ev.model_dump_json())
        assert type(back) is type(ev) and back == ev
        assert parse_stream_event(ev.model_dump()) == ev
    with pytest.raises(ValidationError):
        parse_stream_event('{"event": "bogus", "request_id": "a", "trace_id": "t"}')


def test_error_codes_map_to_http_statuses():
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert HTTP_STATUS[ErrorCode.CONTEXT_LENGTH_EXCEEDED] == 400
    assert HTTP_STATUS[ErrorCode.MODEL_NOT_FOUND] == 404
    e = ProtocolError("UNAVAILABLE", "engine e0 died")
    assert e.code is ErrorCode.UNAVAILABLE and e.error.http_status == 503
    assert Error.model_validate_json(e.error.model_dump_json()) == e.error
