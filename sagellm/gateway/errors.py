"""Error bodies of the gateway: every failure becomes a protocol Error, rendered as the OpenAI
error object on the OpenAI routes and as `{"error": protocol.Error}` on the engine-only routes.

A message that leaves the server never carries a stack trace or a filesystem path: messages that
come from deeper layers (engine errors, tokenizer errors) are scrubbed of paths, and anything
unexpected becomes INTERNAL with a generic message, logged here with its trace id.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pydantic
from fastapi.responses import JSONResponse

from sagellm.protocol import HTTP_STATUS, Error, ErrorCode, ProtocolError

log = logging.getLogger("sagellm.gateway")

# OpenAI clients switch on `type`; the protocol code goes in `code`.
_OPENAI_TYPE = {
    ErrorCode.INVALID_ARGUMENT: "invalid_request_error",
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorCode.UNAUTHENTICATED: "authentication_error",
    ErrorCode.MODEL_NOT_FOUND: "not_found_error",
    ErrorCode.PAYLOAD_TOO_LARGE: "invalid_request_error",
    ErrorCode.RESOURCE_EXHAUSTED: "rate_limit_error",
    ErrorCode.CANCELLED: "cancelled_error",
    ErrorCode.TIMEOUT: "timeout_error",
    ErrorCode.UNAVAILABLE: "service_unavailable_error",
    ErrorCode.INTERNAL: "server_error",
}

# An absolute POSIX path of two or more components, or a Windows drive path; not preceded by
# ':' or '/' so URLs ("http://host/...") keep their scheme.
_PATH = re.compile(r"(?<![\w:/.])(?:/[\w.\-~+@]+){2,}/?|\b[A-Za-z]:\\[^\s'\"]+")


def scrub(message: str) -> str:
    """`message` with filesystem paths replaced by '<path>'."""
    return _PATH.sub("<path>", message)


class GatewayError(ProtocolError):
    """A ProtocolError with an HTTP status other than the code's default (503 for a full queue),
    extra response headers (Retry-After) and the request field at fault (`param`)."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(code, message)
        self.param = param
        self.status = status or HTTP_STATUS[self.code]
        self.headers = headers or {}


def as_protocol_error(exc: BaseException, trace_id: str | None = None) -> GatewayError:
    """Any exception as a GatewayError; unknown ones become INTERNAL and are logged."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ProtocolError):
        return GatewayError(exc.code, scrub(exc.error.message))
    if isinstance(exc, pydantic.ValidationError):
        return validation_error(exc)
    log.error("internal error (trace_id=%s)", trace_id, exc_info=exc)
    return GatewayError(
        ErrorCode.INTERNAL, f"internal server error (trace_id={trace_id or 'unknown'})"
    )


def validation_error(exc: pydantic.ValidationError, prefix: str = "") -> GatewayError:
    """The first validation problem as a 400 naming the field, its value and what is allowed."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return GatewayError(ErrorCode.INVALID_ARGUMENT, "the request body is not valid JSON")
    param = f"{prefix}{loc}" if loc else None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        text = f"{param} is required"
    elif err.get("type") == "extra_forbidden":
        text = f"{param} is not a recognised field"
    elif param:
        text = f"{param} = {_short(err.get('input'))} is invalid: {msg}"
    else:
        text = f"the request body is invalid: {msg}"
    return GatewayError(ErrorCode.INVALID_ARGUMENT, text, param=param)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def openai_error_body(err: GatewayError) -> dict[str, Any]:
    return {
        "error": {
            "message": err.error.message,
            "type": _OPENAI_TYPE[err.code],
            "param": err.param,
            "code": err.code.value,
        }
    }


def protocol_error_body(err: GatewayError) -> dict[str, Any]:
    return {"error": Error(code=err.code, message=err.error.message).model_dump(mode="json")}


def error_response(err: GatewayError, *, engine_format: bool = False) -> JSONResponse:
    body = protocol_error_body(err) if engine_format else openai_error_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers)
