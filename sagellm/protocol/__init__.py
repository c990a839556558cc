"""Protocol v0.1: the types that cross component boundaries (gateway <-> control plane <->
engine, in process or over HTTP) and that users see. PROTOCOL.md is the specification."""

from sagellm.protocol.errors import HTTP_STATUS, Error, ErrorCode, ProtocolError
from sagellm.protocol.types import (
    PROTOCOL_VERSION,
    Metrics,
    Request,
    Response,
    StreamDelta,
    StreamEnd,
    StreamEvent,
    StreamStart,
    TokenLogprob,
    Usage,
    new_request_id,
    new_trace_id,
    parse_stream_event,
)

__all__ = [
    "HTTP_STATUS",
    "PROTOCOL_VERSION",
    "Error",
    "ErrorCode",
    "Metrics",
    "ProtocolError",
    "Request",
    "Response",
    "StreamDelta",
    "StreamEnd",
    "StreamEvent",
    "StreamStart",
    "TokenLogprob",
    "Usage",
    "new_request_id",
    "new_trace_id",
    "parse_stream_event",
]
