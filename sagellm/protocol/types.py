"""Request, Response, Metrics and stream events of Protocol v0.1 (pydantic v2).

Deviations from the public v0.1 (each so that OpenAI-style clients work unchanged): `prompt` may
be a list of token ids; temperature 0 means greedy; top_k, min_p, seed, stop, stop_token_ids,
penalties, ignore_eos, logprobs, n and priority are accepted; responses carry `usage`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from sagellm.protocol.errors import Error

PROTOCOL_VERSION = "0.1"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def new_trace_id() -> str:
    return uuid.uuid4().hex


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default_factory=new_request_id, min_length=1)
    trace_id: str = Field(default_factory=new_trace_id, min_length=1)
    model: str
    prompt: str | list[Annotated[int, Field(ge=0)]]
    max_tokens: int = Field(gt=0)
    stream: bool = False
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    n: int = Field(default=1, ge=1, le=16)
    kv_budget_tokens: int | None = Field(default=None, gt=0)
    priority: int = 0
    metadata: dict[str, str] = Field(default_factory=dict)


class Metrics(BaseModel):
    """Per-request (or aggregate) measurements; 0 when not measured, ranges validated."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float = Field(default=0.0, ge=0)
    tbt_ms: float = Field(default=0.0, ge=0)
    tpot_ms: float = Field(default=0.0, ge=0)
    throughput_tps: float = Field(default=0.0, ge=0)
    peak_mem_mb: float = Field(default=0.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    kv_used_tokens: int = Field(default=0, ge=0)
    kv_used_bytes: int = Field(default=0, ge=0)
    prefix_hit_rate: float = Field(default=0.0, ge=0, le=1)
    evict_count: int = Field(default=0, ge=0)
    evict_ms: float = Field(default=0.0, ge=0)
    spec_accept_rate: float = Field(default=0.0, ge=0, le=1)


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FinishReason = Literal["stop", "length", "abort", "error"]


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    trace_id: str
    output_text: str = ""
    output_tokens: list[int] = Field(default_factory=list)
    finish_reason: FinishReason
    metrics: Metrics = Field(default_factory=Metrics)
    error: Error | None = None
    usage: Usage | None = None
    engine_id: str | None = None
    index: int = 0


class TokenLogprob(BaseModel):
    """The chosen token's log-probability and the top alternatives, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    trace_id: str
    engine_id: str = ""
    index: int = 0


class StreamStart(_EventBase):
    event: Literal["start"] = "start"
    prompt_tokens: int = Field(default=0, ge=0)


class StreamDelta(_EventBase):
    event: Literal["delta"] = "delta"
    chunk: str = ""
    chunk_tokens: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per chunk token, when the request asked


class StreamEnd(_EventBase):
    event: Literal["end"] = "end"
    output_text: str = ""
    output_tokens: list[int] = Field(default_factory=list)
    finish_reason: FinishReason
    metrics: Metrics = Field(default_factory=Metrics)
    error: Error | None = None
    usage: Usage | None = None


StreamEvent = Annotated[StreamStart | StreamDelta | StreamEnd, Field(discriminator="event")]
_EVENT = TypeAdapter(StreamEvent)


def parse_stream_event(data: str | bytes | dict[str, Any]) -> StreamStart | StreamDelta | StreamEnd:
    """One stream event from JSON text or a dict (validated; raises pydantic.ValidationError)."""
    if isinstance(data, dict):
        return _EVENT.validate_python(data)
    return _EVENT.validate_json(data)
