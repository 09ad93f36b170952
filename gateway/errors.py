"""Typed errors to HTTP status and gRPC code: the one table, used at the edge only."""

from __future__ import annotations

import grpc

from modelpool.placement.errors import (
    DoesNotFit,
    InferenceError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    ModelpoolError,
    PayloadTooLarge,
    Unavailable,
)

#: Most specific class first; ``status_of`` walks the MRO so subclasses inherit.
TABLE: dict[type[ModelpoolError], tuple[int, grpc.StatusCode]] = {
    InvalidInput: (400, grpc.StatusCode.INVALID_ARGUMENT),
    InferenceError: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ModelLoadError: (400, grpc.StatusCode.FAILED_PRECONDITION),
    ModelNotReady: (400, grpc.StatusCode.UNAVAILABLE),
    ModelNotFound: (404, grpc.StatusCode.NOT_FOUND),
    PayloadTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    DoesNotFit: (503, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Unavailable: (503, grpc.StatusCode.UNAVAILABLE),
}


def status_of(err: ModelpoolError) -> tuple[int, grpc.StatusCode]:
    for cls in type(err).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return 500, grpc.StatusCode.INTERNAL


def outcome_of(err: BaseException) -> str:
    """The ``outcome`` label of modelpool_requests_total for a failed request."""
    if not isinstance(err, ModelpoolError):
        return "error"
    status, _ = status_of(err)
    if status == 503:
        return "unavailable"
    if status < 500:
        return "client_error"
    return "error"


def retry_after(err: ModelpoolError) -> float | None:
    """Seconds for a Retry-After header; None where waiting will not help."""
    if isinstance(err, Unavailable):
        return err.retry_after_s
    return None
