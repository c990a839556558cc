"""Per-request sampling parameters, validated at the edge so bad input becomes a clear 400."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this are treated as greedy: dividing logits by a tiny temperature overflows
# to inf, and the distribution is an argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _is_int(value: object) -> bool:
    # bool is an int subclass; `max_tokens=True` is a client bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _bad(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name} = {value!r} is invalid: expected {allowed}")


@dataclass
class SamplingParams:
    """How to turn one request's logits into tokens and when to stop.

    Defaults are greedy (``temperature = 0``) so that output is reproducible unless a client asks
    for randomness. Switched-off values: ``top_k`` 0 or -1, ``top_p`` 1, ``min_p`` 0,
    ``repetition_penalty`` 1, ``presence_penalty`` / ``frequency_penalty`` 0.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # HF/vLLM semantics over prompt + output tokens: positive logits / penalty, negative * penalty.
    repetition_penalty: float = 1.0
    # OpenAI semantics over output tokens: logit -= presence * (count > 0) + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Number of top alternatives to return besides the chosen token's logprob; None = no logprobs.
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise _bad("max_tokens", self.max_tokens, "an integer > 0")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise _bad("temperature", self.temperature, "a number in [0, 2] (0 = greedy)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)):
            raise _bad("top_k", self.top_k, "an integer >= 1, or 0 / -1 for off")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "a number in [0, 1] (0 = off)")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise _bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise _bad(name, value, "a number in [-2, 2] (0 = off)")
        if self.seed is not None and (
            not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX
        ):
            raise _bad("seed", self.seed, f"null or an integer in [{_SEED_MIN}, {_SEED_MAX}]")
        if not _is_int(self.n) or self.n < 1:
            raise _bad("n", self.n, "an integer >= 1")
        self.stop = self._check_stop(self.stop)
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise _bad("logprobs", self.logprobs, f"null or an integer in [0, {MAX_LOGPROBS}]")

    @staticmethod
    def _check_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise _bad("stop", stop, "a string or a list of strings")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise _bad(f"stop[{i}]", s, "a non-empty string")
        return list(stop)

    @staticmethod
    def _check_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise _bad("stop_token_ids", ids, "a list of integers")
        for i, t in enumerate(ids):
            if not _is_int(t) or t < 0:
                raise _bad(f"stop_token_ids[{i}]", t, "an integer >= 0")
        return list(ids)

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax of the (penalised) logits."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
