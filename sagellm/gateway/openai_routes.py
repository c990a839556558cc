"""POST /v1/completions, POST /v1/chat/completions and GET /v1/models."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pydantic
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from sagellm.gateway.errors import (
    GatewayError,
    as_protocol_error,
    error_response,
    openai_error_body,
    validation_error,
)
from sagellm.gateway.openai_api import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    resolve_max_tokens,
    resolve_model,
)
from sagellm.gateway.openai_format import (
    SSE_DONE,
    Collector,
    Formatter,
    TokenText,
    event_logprobs,
    sse,
)
from sagellm.gateway.streaming import EventStream, SSEResponse
from sagellm.protocol import ErrorCode, StreamDelta, StreamEnd, new_request_id, new_trace_id

if TYPE_CHECKING:
    from sagellm.gateway.app import GatewayState


def trace_id_of(request: HttpRequest) -> str:
    """The caller's trace id (X-Request-Id, or the trace-id field of a W3C traceparent)."""
    rid = request.headers.get("x-request-id")
    if rid and 0 < len(rid) <= 128:
        return rid
    parent = request.headers.get("traceparent", "").split("-")
    if len(parent) == 4 and len(parent[1]) == 32:
        return parent[1]
    return new_trace_id()


def _max_model_len(state: GatewayState, model: str) -> int | None:
    for h in state.manager.engines():
        if h.model == model:
            try:
                value = h.info().get("max_model_len")
            except Exception:
                return None
            return int(value) if value else None
    return None


def build_router(state: GatewayState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> JSONResponse:
        data = [
            {"id": m, "object": "model", "created": state.started, "owned_by": "sagellm"}
            for m in state.manager.models()
        ]
        return JSONResponse({"object": "list", "data": data})

    @router.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await _serve(state, http, "completion")

    @router.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await _serve(state, http, "chat")

    return router


def _parse(kind: str, body: bytes) -> CompletionRequest | ChatCompletionRequest:
    model_cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
    if not body.strip():
        raise GatewayError(ErrorCode.INVALID_ARGUMENT, "the request body is empty")
    try:
        return model_cls.model_validate_json(body)
    except pydantic.ValidationError as e:
        raise validation_error(e) from None


def _prompt(state: GatewayState, kind: str, body: Any, model: str) -> str | list[int]:
    if kind == "completion":
        return body.prompt
    tok = state.manager.tokenizer_for(model)
    if tok is None or not tok.has_chat_template:
        raise GatewayError(
            ErrorCode.INVALID_ARGUMENT,
            f"model {model!r} has no chat template here; use the completions endpoint "
            "with a raw prompt",
            param="messages",
        )
    messages = [m.as_template_dict() for m in body.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    except Exception as e:  # a template that rejects these messages (e.g. role order)
        raise GatewayError(
            ErrorCode.INVALID_ARGUMENT,
            f"the chat template of {model!r} rejected the messages: {e}",
            param="messages",
        ) from None
    # The template already holds any BOS token: pass ids so the engine adds none.
    return tok.encode(text, add_special_tokens=False)


async def _serve(state: GatewayState, http: HttpRequest, kind: str):
    trace_id = trace_id_of(http)
    headers = {"X-Request-Id": trace_id}
    t0 = time.monotonic()
    deadline = t0 + state.settings.request_timeout_s
    granted = None
    stream = None
    try:
        body = _parse(kind, await http.body())
        served = state.manager.models()
        model = resolve_model(body.model, served)
        if model not in served:
            raise GatewayError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {model!r} is not served here; available: {', '.join(served) or 'none'}",
                param="model",
            )
        prompt = _prompt(state, kind, body, model)
        if kind == "chat":
            asked = body.max_completion_tokens or body.max_tokens
            plen = len(prompt)
            max_len = _max_model_len(state, model)
            max_tokens = resolve_max_tokens(asked, max_len or 1024, plen, max_len)
            logprobs = body.requested_logprobs()
        else:
            max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
            logprobs = body.logprobs
        request_id = new_request_id()
        try:
            req = body.to_request(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                logprobs=logprobs,
                request_id=request_id,
                trace_id=trace_id,
            )
        except pydantic.ValidationError as e:
            raise validation_error(e) from None
        granted = await _acquire(state, deadline)
        stream = await EventStream.open(state.manager, req, deadline)
        first = await stream.next()  # a refused request raises here, before any byte is sent
        tok = state.manager.tokenizer_for(model)
        fmt = Formatter(kind, request_id, model, TokenText(tok), logprobs is not None)
        if not body.stream:
            col = Collector(req.n)
            await _unless_disconnected(http, _collect(col, first, stream))
            _finish(state, col, t0)
            failed = next((c for c in col.choices if c.error_code is not None), None)
            if failed is not None:
                raise GatewayError(failed.error_code, failed.error_message)
            if not col.done():
                raise GatewayError(ErrorCode.UNAVAILABLE, "the engine ended the stream early")
            return JSONResponse(fmt.response(col), headers=headers)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        col = Collector(req.n)
        events, release = stream, granted
        stream, granted = None, None  # the response owns them now

        def on_close(disconnected: bool) -> Any:
            state.admission.release(release)
            if disconnected:
                state.metrics.observe_choice("cancelled")
            else:
                _finish(state, col, t0)
            return events.aclose()

        body_iter = _stream_body(fmt, events, first, col, include_usage, trace_id)
        return SSEResponse(body_iter, on_close, headers)
    except Exception as e:
        err = as_protocol_error(e, trace_id)
        err.headers.update(headers)
        return error_response(err)
    finally:
        if stream is not None:
            await stream.aclose()
        if granted is not None:
            state.admission.release(granted)


async def _collect(col: Collector, event, stream: EventStream) -> None:
    while event is not None:
        col.add(event)
        if col.done():
            return
        event = await stream.next()


async def _unless_disconnected(http: HttpRequest, work) -> None:
    """Run `work`; if the client goes away first, stop it (the caller closes the stream, which
    aborts the request in the engine) and raise CANCELLED."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # let it unwind before anyone closes the stream it is iterating
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise GatewayError(ErrorCode.CANCELLED, "the client went away")
    task.result()


async def _acquire(state: GatewayState, deadline: float) -> float:
    try:
        return await asyncio.wait_for(state.admission.acquire(), deadline - time.monotonic())
    except TimeoutError:
        raise GatewayError(
            ErrorCode.TIMEOUT, "the request waited in the queue past its deadline"
        ) from None


def _finish(state: GatewayState, col: Collector, t0: float) -> None:
    usage = col.usage()
    m = col.choices[0].metrics
    for c in col.choices:
        state.metrics.observe_choice(c.finish_reason)
    if m is not None:
        state.metrics.observe_request(usage["prompt_tokens"], usage["completion_tokens"], m)


async def _stream_body(fmt: Formatter, events: EventStream, first, col: Collector, usage, trace):
    emitted = [""] * len(col.choices)
    try:
        event = first
        while event is not None:
            if isinstance(event, StreamDelta):
                col.add(event)
                lps = event_logprobs(event)
                emitted[event.index] += event.chunk
                if event.chunk or (lps and fmt.want_logprobs):
                    yield sse(fmt.chunk(event.index, event.chunk, lps, None, None, usage))
            elif isinstance(event, StreamEnd):
                done = emitted[event.index]
                rest = event.output_text[len(done) :] if event.output_text.startswith(done) else ""
                col.add(event)
                choice = col.choices[event.index]
                if choice.error_code is not None:
                    raise GatewayError(choice.error_code, choice.error_message)
                lps = event_logprobs(event)
                yield sse(
                    fmt.chunk(event.index, rest, lps, event.finish_reason, event.metrics, usage)
                )
            else:
                col.add(event)
            if col.done():
                break
            event = await events.next()
        if not col.done():
            raise GatewayError(ErrorCode.UNAVAILABLE, "the engine ended the stream early")
        if usage:
            yield sse(fmt.usage_chunk(col))
        yield SSE_DONE
    except Exception as e:
        yield sse(openai_error_body(as_protocol_error(e, trace)))
        yield SSE_DONE
    finally:
        await events.aclose()
