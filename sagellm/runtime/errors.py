"""Errors the engine reports for a request, each with its Protocol v0.1 error code."""

from __future__ import annotations


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung or failed; the engine cannot continue."""


class RequestError(ValueError):
    """A request the engine refuses; `code` is the protocol error code (PROTOCOL.md)."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class ContextLengthExceeded(RequestError):
    code = "CONTEXT_LENGTH_EXCEEDED"


class KVBudgetImpossible(RequestError):
    code = "RESOURCE_EXHAUSTED"
