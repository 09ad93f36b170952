"""Typed errors to HTTP status and gRPC code, at the client edge.

The table itself is the ``http_status``/``grpc_code`` attributes of each class in
``placement/errors.py``; the worker reads the same attributes, so there is one table.
"""

from __future__ import annotations

import asyncio

import grpc

from modelpool.placement.errors import ModelpoolError, RateLimited, Unavailable


def status_of(err: ModelpoolError) -> tuple[int, grpc.StatusCode]:
    """HTTP status and gRPC code of a typed error (500 / INTERNAL only for a bug)."""
    return err.http_status, grpc_status(err)


def grpc_status(err: ModelpoolError) -> grpc.StatusCode:
    return grpc.StatusCode[err.grpc_code]


def outcome_of(err: BaseException) -> str:
    """The ``outcome`` label of modelpool_requests_total for a failed request."""
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"  # the client went away (or the gateway is stopping)
    if not isinstance(err, ModelpoolError):
        return "error"
    status = err.http_status
    if status == 503:
        return "unavailable"
    if status == 504:
        return "deadline"
    if status == 429:
        return "rate_limited"
    if status < 500:
        return "client_error"
    return "error"


def retry_after(err: ModelpoolError) -> float | None:
    """Seconds for a Retry-After header; None where waiting will not help."""
    if isinstance(err, Unavailable | RateLimited):
        return err.retry_after_s
    return None
