"""Protocol stream events -> OpenAI response bodies and SSE chunks (completions and chat).

Every response, and the last chunk of each choice in a stream, carries the protocol `metrics`
as an extra field; OpenAI clients ignore fields they do not know.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagellm.protocol import ErrorCode, Metrics, StreamDelta, StreamEnd, StreamStart

if TYPE_CHECKING:
    from sagellm.models.tokenizer import Tokenizer

FINISH_REASON = {"stop": "stop", "length": "length", "abort": "stop"}


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


class TokenText:
    """Token ids as text for logprobs: the decoded piece, or `token_id:N` without a tokenizer."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def event_logprobs(event: StreamDelta | StreamEnd) -> list[Any]:
    """Per-token logprob entries of an event: `{token_id, logprob, top: [(id, logprob)...]}`
    dicts or objects with those attributes; [] when the engine sent none."""
    return list(_get(event, "logprobs", None) or [])


@dataclass
class Choice:
    """One choice accumulated over a stream."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: Metrics | None = None
    error_code: ErrorCode | None = None
    error_message: str = ""


class Collector:
    """Folds a request's events (all its choices) into per-choice results and usage."""

    def __init__(self, n: int):
        self.choices = [Choice(i) for i in range(n)]
        self.prompt_tokens = 0

    def add(self, event: StreamStart | StreamDelta | StreamEnd) -> Choice | None:
        if isinstance(event, StreamStart):
            self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
            return None
        c = self.choices[event.index]
        c.logprobs.extend(event_logprobs(event))
        if isinstance(event, StreamDelta):
            c.text += event.chunk
            c.token_ids.extend(event.chunk_tokens)
            return c
        c.text, c.token_ids = event.output_text, list(event.output_tokens)
        c.finish_reason, c.metrics = event.finish_reason, event.metrics
        if event.usage is not None:
            self.prompt_tokens = max(self.prompt_tokens, event.usage.prompt_tokens)
        if event.error is not None:
            c.error_code, c.error_message = event.error.code, event.error.message
        elif event.finish_reason == "error":
            c.error_code, c.error_message = ErrorCode.INTERNAL, "the engine failed the request"
        return c

    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict[str, int]:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def metrics(self) -> dict[str, Any]:
        """Metrics of the request: its first choice's (they share the prompt and the batch)."""
        m = self.choices[0].metrics or Metrics()
        return m.model_dump(mode="json")


def completion_logprobs(entries: list[Any], token_text: TokenText, offset: int = 0) -> dict:
    """The legacy completions logprobs object over `entries`."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        t = token_text(_get(e, "token_id"))
        tokens.append(t)
        lps.append(_get(e, "logprob"))
        top = _get(e, "top", None) or []
        tops.append({token_text(tid): lp for tid, lp in top} if top else None)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[Any], token_text: TokenText) -> dict:
    def item(tid: int, lp: float) -> dict:
        t = token_text(tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    content = []
    for e in entries:
        d = item(_get(e, "token_id"), _get(e, "logprob"))
        d["top_logprobs"] = [item(tid, lp) for tid, lp in (_get(e, "top", None) or [])]
        content.append(d)
    return {"content": content}


class Formatter:
    """Builds the bodies of one request, for `kind` 'chat' or 'completion'."""

    def __init__(self, kind: str, request_id: str, model: str, token_text: TokenText, lp: bool):
        self.kind, self.model, self.token_text, self.want_logprobs = kind, model, token_text, lp
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{request_id.removeprefix('req-')}"
        self.created = int(time.time())
        self.role_sent: set[int] = set()
        self.text_offset: dict[int, int] = {}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, col: Collector) -> dict[str, Any]:
        choices = []
        for c in col.choices:
            reason = FINISH_REASON.get(c.finish_reason or "stop", "stop")
            if self.kind == "chat":
                lp = chat_logprobs(c.logprobs, self.token_text) if self.want_logprobs else None
                msg = {"role": "assistant", "content": c.text}
                choices.append(
                    {"index": c.index, "message": msg, "logprobs": lp, "finish_reason": reason}
                )
            else:
                lp = (
                    completion_logprobs(c.logprobs, self.token_text) if self.want_logprobs else None
                )
                choices.append(
                    {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": reason}
                )
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            **self._head(obj),
            "choices": choices,
            "usage": col.usage(),
            "metrics": col.metrics(),
        }

    def chunk(
        self,
        index: int,
        text: str,
        entries: list[Any],
        finish_reason: str | None,
        metrics: Metrics | None,
        include_usage: bool,
    ) -> dict[str, Any]:
        """One streamed chunk for choice `index`; `finish_reason` set on its last one."""
        reason = FINISH_REASON.get(finish_reason) if finish_reason else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if index not in self.role_sent:
                self.role_sent.add(index)
                delta = {"role": "assistant", **delta}
            lp = chat_logprobs(entries, self.token_text) if self.want_logprobs else None
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            lp = None
            if self.want_logprobs:
                start = self.text_offset.get(index, 0)
                lp = completion_logprobs(entries, self.token_text, start)
                self.text_offset[index] = start + sum(len(t) for t in lp["tokens"])
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        if metrics is not None:
            body["metrics"] = metrics.model_dump(mode="json")
        return body

    def usage_chunk(self, col: Collector) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": col.usage(), "metrics": col.metrics()}
