"""`create_app(manager, settings)`: the FastAPI app of the gateway (and of an engine-only server,
with `engine_routes=True`) over a ControlPlaneManager.

Routes: /v1/chat/completions, /v1/completions, /v1/models (OpenAI), /health, /metrics, and the
/v1/engine/* routes of engine_routes.py. The app's lifespan starts the manager and, on shutdown,
waits for in-flight requests (up to `drain_timeout_s`) before stopping it.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sagellm.gateway.engine_routes import build_engine_router
from sagellm.gateway.errors import GatewayError, as_protocol_error, error_response
from sagellm.gateway.limits import AdmissionQueue, BodyLimitMiddleware
from sagellm.gateway.metrics import CONTENT_TYPE, GatewayMetrics, RequestCounterMiddleware
from sagellm.gateway.openai_routes import build_router
from sagellm.protocol import ErrorCode

log = logging.getLogger("sagellm.gateway")


class GatewaySettings(BaseModel):
    """How the gateway admits requests. `api_key` None = no authentication."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(default=None, min_length=1)
    max_body_bytes: int = Field(default=2**20, gt=0)
    max_concurrent: int = Field(default=64, ge=1)
    max_queue: int = Field(default=256, ge=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    engine_routes: bool = False
    # start the manager when the app starts (the lifespan always stops it)
    start_manager: bool = True
    drain_timeout_s: float = Field(default=30.0, ge=0)


@dataclass
class GatewayState:
    manager: Any  # ControlPlaneManager (typed loosely: the gateway sits above it)
    settings: GatewaySettings
    admission: AdmissionQueue
    metrics: GatewayMetrics
    started: int


def _engine_format(request: HttpRequest) -> bool:
    return request.url.path.startswith("/v1/engine/")


def create_app(manager: Any, settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    state = GatewayState(
        manager=manager,
        settings=settings,
        admission=AdmissionQueue(settings.max_concurrent, settings.max_queue),
        metrics=GatewayMetrics(),
        started=int(time.time()),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.start_manager:
            await manager.start()
        if settings.engine_routes:
            _check_single_local_engine(manager)
        try:
            yield
        finally:
            if not await state.admission.wait_idle(settings.drain_timeout_s):
                log.warning(
                    "shutdown: %d requests still running after %.0f s; stopping anyway",
                    state.admission.running,
                    settings.drain_timeout_s,
                )
            await manager.stop(drain_timeout_s=settings.drain_timeout_s)

    app = FastAPI(title="sageLLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = state

    async def require_key(request: HttpRequest) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app.include_router(build_router(state), dependencies=[Depends(require_key)])
    if settings.engine_routes:
        app.include_router(build_engine_router(state), dependencies=[Depends(require_key)])

    @app.get("/health")
    async def health() -> JSONResponse:
        engines = manager.engines()
        ready = [h for h in engines if _state_name(h) == "READY"]
        body: dict[str, Any] = {"status": "ok" if ready else "unavailable"}
        if settings.engine_routes and len(engines) == 1:
            body.update(engine_id=engines[0].engine_id, model=engines[0].model)
        body["engines"] = [
            {"engine_id": h.engine_id, "model": h.model, "state": _state_name(h)} for h in engines
        ]
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        data = state.metrics.render(manager.engines(), state.admission)
        return Response(data, media_type=CONTENT_TYPE)

    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: HttpRequest, exc: GatewayError):
        return error_response(exc, engine_format=_engine_format(request))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        err = GatewayError(
            ErrorCode.INVALID_ARGUMENT, f"invalid request: {first.get('msg', 'bad input')}"
        )
        return error_response(err, engine_format=_engine_format(request))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: HttpRequest, exc: StarletteHTTPException):
        code = ErrorCode.INVALID_ARGUMENT
        msg = (
            f"no such endpoint: {request.method} {request.url.path}"
            if exc.status_code == 404
            else f"{request.method} is not allowed here"
            if exc.status_code == 405
            else "bad request"
        )
        err = GatewayError(code, msg, status=exc.status_code)
        return error_response(err, engine_format=_engine_format(request))

    @app.exception_handler(Exception)
    async def on_any_error(request: HttpRequest, exc: Exception):
        err = as_protocol_error(exc, request.headers.get("x-request-id"))
        return error_response(err, engine_format=_engine_format(request))

    # Outermost first: count every response, then bound the body before anything reads it.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestCounterMiddleware, metrics=state.metrics)
    return app


def _state_name(handle) -> str:
    state = handle.state
    return str(getattr(state, "name", state)).upper()


def _check_single_local_engine(manager: Any) -> None:
    from sagellm.control_plane.engines import LocalEngine

    engines = manager.engines()
    if len(engines) != 1 or not isinstance(engines[0], LocalEngine):
        kinds = ", ".join(type(h).__name__ for h in engines) or "none"
        raise ValueError(f"engine_routes needs exactly one LocalEngine; the manager holds {kinds}")
