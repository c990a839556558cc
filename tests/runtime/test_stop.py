"""StopChecker: streaming stop strings, driven the way the engine drives it."""

from __future__ import annotations

import random

import pytest

from sagellm.runtime.stop import StopChecker


def run_stream(checker: StopChecker, deltas: list[str]):
    """The engine's loop: returns (chunks streamed, final text, stop string or None)."""
    text, sent, streamed = "", 0, []
    for delta in deltas:
        text += delta
        m = checker.check(text, len(delta))
        if m.stopped:
            assert m.safe_len == m.end >= sent  # nothing already streamed is taken back
            text = text[: m.end]
            streamed.append(text[sent:])
            return streamed, text, m.stop_str
        assert m.end == len(text)
        streamed.append(text[sent : m.safe_len])
        sent = max(sent, m.safe_len)
    streamed.append(text[sent:])  # finished for another reason: release what was held
    return streamed, text, None


def reference(text: str, stops: list[str], include: bool):
    """First position where a stop string ends; the longest of those ending there."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            s = max(ending, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("include", [False, True])
def test_stop_split_across_deltas(include):
    checker = StopChecker(["###"], include)
    streamed, text, stop = run_stream(checker, ["Hello #", "#", "# world"])
    assert stop == "###"
    assert text == ("Hello ###" if include else "Hello ")
    assert "".join(streamed) == text
    if not include:
        # the partial "#", "##" were held back, never shown and then retracted
        assert streamed[:2] == ["Hello ", ""]


def test_held_back_text_is_released():
    checker = StopChecker(["</answer>"], False)
    m = checker.check("the answer is </ans", 19)
    assert not m.stopped and m.safe_len == len("the answer is ")
    m = checker.check("the answer is </ans>", 1)
    assert not m.stopped and m.safe_len == len("the answer is </ans>")
    streamed, text, stop = run_stream(checker, ["a <", "/", "answ", "er", "!> done"])
    assert stop is None and text == "a </answer!> done"
    assert "".join(streamed) == text
    # finishing for another reason while text is held back releases it
    streamed, text, stop = run_stream(checker, ["x </an"])
    assert stop is None and streamed == ["x ", "</an"]


def test_earliest_stop_wins():
    checker = StopChecker(["world", "lo w", "o"], False)
    m = checker.check("hello world", 11)
    assert m.stopped and m.stop_str == "o" and m.end == 4
    # same end position: the longer string (earlier start) wins
    checker = StopChecker(["b", "ab", "xab"], False)
    assert checker.check("zzxab", 5).stop_str == "xab"
    assert checker.check("zzxab", 5).end == 2


def test_result_independent_of_chunking():
    # "c" completes before "abcd" does, whether the text arrives at once or char by char.
    checker = StopChecker(["abcd", "c"], False)
    assert run_stream(checker, ["abcd"])[1:] == ("ab", "c")
    assert run_stream(checker, list("abcd"))[1:] == ("ab", "c")


def test_matches_only_in_new_text():
    checker = StopChecker(["stop"], False)
    # "stop" lies entirely in text that was already checked: not reported again
    assert not checker.check("please stop now", 4).stopped
    assert checker.check("please stop", 3).stopped
    with pytest.raises(ValueError, match="new_len = 5 is out of range"):
        checker.check("abc", 5)


def test_no_stop_strings_streams_everything():
    checker = StopChecker([], False)
    m = checker.check("anything", 8)
    assert not m.stopped and m.safe_len == 8


def test_include_stop_str_holds_nothing_back():
    checker = StopChecker(["###"], True)
    assert checker.check("text ##", 7).safe_len == 7
    m = checker.check("text ### more", 6)
    assert m.stopped and m.end == len("text ###")


def test_invalid_stop_strings():
    with pytest.raises(ValueError, match=r"stop\[1\] = ''"):
        StopChecker(["a", ""], False)
    assert StopChecker("END", False).stop == ["END"]


@pytest.mark.parametrize("include", [False, True])
def test_random_streams_against_reference(include):
    rng = random.Random(42 + include)
    for _ in range(600):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(3)]
        cuts = [rng.randint(0, len(text)) for _ in range(rng.randint(0, 6))]
        streamed, final, stop = run_stream(StopChecker(stops, include), split(text, cuts))
        assert (final, stop) == reference(text, stops, include), (text, stops, cuts)
        assert "".join(streamed) == final
