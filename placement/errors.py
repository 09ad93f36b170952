"""The one error hierarchy of modelpool.

Every package raises these; ``gateway/errors.py`` maps each class to an HTTP status and
a gRPC code in a single table at the edge. Foreign errors (redis, grpc, torch) are
translated where they enter, never let through.
"""

from __future__ import annotations


class ModelpoolError(Exception):
    """Root of all modelpool errors. Unmapped subclasses become HTTP 500 (a bug)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ModelpoolError):
    """The request is malformed or does not match the model's inputs. HTTP 400."""


class ModelNotFound(ModelpoolError):
    """No such model, or no such version, in the repository. HTTP 404."""


class ModelNotReady(ModelpoolError):
    """The model exists but cannot serve (bad config, failed load). HTTP 400, as Triton."""


class PayloadTooLarge(ModelpoolError):
    """The request body is over the configured limit. HTTP 413."""


class Unavailable(ModelpoolError):
    """A transient capacity problem: waiting may help. HTTP 503 with Retry-After.

    Args:
        retry_after_s: seconds a client should wait before retrying.
    """

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DoesNotFit(ModelpoolError):
    """The model is larger than any device could ever hold. HTTP 503, no Retry-After:
    waiting will not help."""


class ModelLoadError(ModelpoolError):
    """The model's artifact could not be loaded (corrupt file, OOM). HTTP 400 for the
    request that triggered it; the model is marked failed with this reason."""


class InferenceError(ModelpoolError):
    """The model raised while computing. HTTP 400: the input drove it there, and the
    worker survives."""


class OutOfMemory(Unavailable):
    """A load or a request ran out of device memory. The copy is released; placement
    may try elsewhere with a larger reservation. HTTP 503 with Retry-After."""


class WorkerUnavailable(Unavailable):
    """The worker holding the copy went away mid-request."""


class ResidencyStoreError(Unavailable):
    """The residency store (Redis) cannot be reached; warm routes keep working."""
