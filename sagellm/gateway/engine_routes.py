"""The engine-only API (`sage-llm serve --engine-only`), spoken by RemoteEngine:

    GET  /v1/engine/info      EngineHandle.info() plus engine_id and model
    GET  /v1/engine/load      EngineLoad as JSON
    POST /v1/engine/generate  protocol.Request -> SSE of protocol stream events

Errors here are `{"error": protocol.Error}`, not OpenAI objects: the client is another sageLLM
component that rebuilds the ProtocolError from them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import pydantic
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from sagellm.gateway.errors import GatewayError, as_protocol_error, error_response, validation_error
from sagellm.gateway.openai_format import sse
from sagellm.gateway.streaming import EventStream, SSEResponse
from sagellm.protocol import Error, ErrorCode, Request, StreamEnd, StreamStart

if TYPE_CHECKING:
    from sagellm.gateway.app import GatewayState


def _the_engine(state: GatewayState):
    engines = state.manager.engines()
    if len(engines) != 1:
        raise GatewayError(ErrorCode.UNAVAILABLE, f"this server holds {len(engines)} engines")
    return engines[0]


def build_engine_router(state: GatewayState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/engine/info")
    async def info() -> JSONResponse:
        try:
            h = _the_engine(state)
            body = {**h.info(), "engine_id": h.engine_id, "model": h.model}
            return JSONResponse(_jsonable(body))
        except Exception as e:
            return error_response(as_protocol_error(e), engine_format=True)

    @router.get("/v1/engine/load")
    async def load() -> JSONResponse:
        try:
            return JSONResponse(dataclasses.asdict(_the_engine(state).load()))
        except Exception as e:
            return error_response(as_protocol_error(e), engine_format=True)

    @router.post("/v1/engine/generate")
    async def generate(http: HttpRequest):
        return await _generate(state, http)

    return router


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # dtypes, devices, enums


async def _generate(state: GatewayState, http: HttpRequest):
    trace_id = http.headers.get("x-request-id", "")
    granted = stream = None
    try:
        try:
            req = Request.model_validate_json(await http.body())
        except pydantic.ValidationError as e:
            raise validation_error(e) from None
        trace_id = req.trace_id
        deadline = time.monotonic() + state.settings.request_timeout_s
        granted = await state.admission.acquire()
        stream = await EventStream.open(state.manager, req, deadline)
        first = await stream.next()  # refusals raise here, with their own HTTP status
        events, release = stream, granted
        stream = granted = None

        def on_close(disconnected: bool) -> Any:
            state.admission.release(release)
            if disconnected:
                state.metrics.observe_choice("cancelled")
            return events.aclose()

        return SSEResponse(_events_body(req, events, first), on_close)
    except Exception as e:
        return error_response(as_protocol_error(e, trace_id), engine_format=True)
    finally:
        if stream is not None:
            await stream.aclose()
        if granted is not None:
            state.admission.release(granted)


async def _events_body(req: Request, events: EventStream, first):
    open_choices = set(range(req.n))
    engine_id = ""
    try:
        event = first
        while event is not None:
            engine_id = event.engine_id or engine_id
            if isinstance(event, StreamEnd):
                open_choices.discard(event.index)
            yield sse(event.model_dump_json())
            if isinstance(event, StreamStart) or open_choices:
                event = await events.next()
            else:
                break
        if open_choices:
            raise GatewayError(ErrorCode.UNAVAILABLE, "the engine ended the stream early")
    except Exception as e:
        err = as_protocol_error(e, req.trace_id)
        for index in sorted(open_choices):
            end = StreamEnd(
                request_id=req.request_id,
                trace_id=req.trace_id,
                engine_id=engine_id,
                index=index,
                finish_reason="error",
                error=Error(code=err.code, message=err.error.message),
            )
            yield sse(end.model_dump_json())
    finally:
        await events.aclose()
