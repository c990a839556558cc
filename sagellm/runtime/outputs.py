"""What the engine hands back after each step, per sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

from sagellm.runtime.metrics import RequestMetrics


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """One sequence's progress in one step. `delta_text` / `new_token_ids` are what this step
    added; `text` / `token_ids` everything so far. `metrics` is set when finished."""

    request_id: str
    index: int
    delta_text: str
    new_token_ids: list[int]
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort
    metrics: RequestMetrics | None = None
    logprobs: list[TokenLogprob] | None = None  # this step's new tokens, when asked for
