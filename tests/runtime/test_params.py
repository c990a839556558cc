"""SamplingParams: defaults, normalisation and every validation error."""

from __future__ import annotations

import math

import pytest

from sagellm.runtime.params import SamplingParams


def test_defaults_are_greedy_and_off():
    p = SamplingParams()
    assert p.max_tokens == 16 and p.temperature == 0.0 and p.is_greedy
    assert p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert not p.uses_penalties
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None
    assert p.skip_special_tokens and not p.include_stop_str_in_output and not p.ignore_eos


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy  # would overflow logits / T
    assert not SamplingParams(temperature=0.7).is_greedy
    assert not SamplingParams(temperature=2).is_greedy


def test_stop_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=(2, 7)).stop_token_ids == [2, 7]


def test_valid_edges():
    SamplingParams(
        max_tokens=1, temperature=2.0, top_p=1e-6, top_k=1, min_p=1.0,
        repetition_penalty=1e-3, presence_penalty=-2, frequency_penalty=2,
        seed=-(2**63), n=4, logprobs=20,
    )  # fmt: skip
    SamplingParams(top_k=-1, logprobs=0, seed=2**64 - 1)
    assert SamplingParams(repetition_penalty=1.2).uses_penalties
    assert SamplingParams(presence_penalty=0.5).uses_penalties
    assert SamplingParams(frequency_penalty=-0.5).uses_penalties


BAD = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.5),
    ("max_tokens", True),
    ("max_tokens", "16"),
    ("temperature", -0.1),
    ("temperature", 2.01),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.2),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", None),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.1),
    ("frequency_penalty", 3),
    ("frequency_penalty", math.nan),
    ("seed", 1.0),
    ("seed", "42"),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("n", 0),
    ("n", 1.0),
    ("stop", 5),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop_token_ids", 2),
    ("stop_token_ids", [1, -1]),
    ("stop_token_ids", [1, "2"]),
    ("ignore_eos", 1),
    ("include_stop_str_in_output", "yes"),
    ("skip_special_tokens", None),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.0),
    ("logprobs", True),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_invalid_value_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"^{field}(\[\d+\])? = ") as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert "expected" in msg
    if not isinstance(value, list):
        assert repr(value) in msg
