"""Stop strings over streamed text.

The engine keeps each sequence's full output text and how much of it was already streamed, and
after every detokenizer delta does::

    text += delta
    match = checker.check(text, len(delta))
    if match.stopped:
        text = text[: match.end]
        stream(text[sent:]); finish("stop")
    else:
        stream(text[sent : match.safe_len]); sent = max(sent, match.safe_len)

and, when the sequence ends for another reason (length, EOS, stop token), streams ``text[sent:]``:
text held back as a possible stop-string start was not one after all.

The stop point is the first position in the text where any stop string *ends*; if several end
there, the longest one (the earliest start) wins. This makes the result independent of how the
text was cut into deltas: with stops ["abcd", "c"], "abcd" arriving at once or char by char both
stop at "c".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    """stopped: a stop string was found; stop_str: which one.
    end: when stopped, the length to truncate the text to (the stop string is excluded unless
        include_stop_str_in_output); else len(text).
    safe_len: how many leading characters may be streamed now; the rest of the text could still
        become (the start of) a stop string. Equals ``end`` when stopped.
    """

    stopped: bool
    stop_str: str | None
    end: int
    safe_len: int


class StopChecker:
    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] = {s!r} is invalid: expected a non-empty string")
        self.stop = list(dict.fromkeys(stop))
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

    def check(self, text: str, new_len: int) -> StopMatch:
        """text: the whole output so far; its last ``new_len`` characters are new since the
        previous call (earlier text was already checked, so matches must end in the new part)."""
        if not 0 <= new_len <= len(text):
            raise ValueError(f"new_len = {new_len} is out of range [0, {len(text)}]")
        old_len = len(text) - new_len
        best: tuple[int, int, str] | None = None  # (match end, -length, stop string)
        for s in self.stop:
            # Start far enough back that a stop string split across deltas is seen, yet late
            # enough that it must end in the new text (older matches were reported already).
            start = text.find(s, max(0, old_len - len(s) + 1))
            if start >= 0:
                key = (start + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is not None:
            match_end, neg_len, s = best
            end = match_end if self.include_stop_str_in_output else match_end + neg_len
            return StopMatch(True, s, end, end)
        return StopMatch(False, None, len(text), len(text) - self.hold_back(text))

    def hold_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string.

        With include_stop_str_in_output the stop string is streamed anyway, so nothing is held.
        """
        if self.include_stop_str_in_output:
            return 0
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
