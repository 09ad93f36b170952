"""The one error hierarchy of modelpool, and the one table of what each becomes.

Every package raises these. Each class states its HTTP status and its gRPC status code
(by name, so this module stays free of grpc); ``gateway/errors.py`` renders them at the
client edge and ``gpu/worker.py`` at the worker's, from these same attributes, so a
worker and a gateway can never disagree about an error. Foreign errors (redis, grpc,
torch) are translated where they enter, never let through.
"""

from __future__ import annotations


class ModelpoolError(Exception):
    """Root of all modelpool errors. A class that does not set its own status is a bug:
    HTTP 500 / INTERNAL."""

    http_status: int = 500
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ModelpoolError):
    """The request is malformed or does not match the model's inputs. HTTP 400."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class Unauthenticated(ModelpoolError):
    """No credentials, or a key no tenant holds. HTTP 401 (with ``WWW-Authenticate:
    Bearer``), gRPC UNAUTHENTICATED. The message never repeats the key."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(ModelpoolError):
    """A known tenant asked for an admin call (repository load/unload, status,
    statistics of every model, log and trace settings). HTTP 403, gRPC PERMISSION_DENIED. A model a tenant may
    not see is ``ModelNotFound`` instead, so that its existence does not leak."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class ModelNotFound(ModelpoolError):
    """No such model, or no such version, in the repository. HTTP 404."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class ModelNotReady(ModelpoolError):
    """The model exists but cannot serve (bad config, failed load, files gone). HTTP
    400, as Triton answers for a model that is not ready; gRPC UNAVAILABLE."""

    http_status = 400
    grpc_code = "UNAVAILABLE"


class TracingNotImplemented(ModelpoolError):
    """A trace level other than OFF: modelpool stores trace settings but produces no
    traces. HTTP 400 (the request cannot succeed as sent), gRPC UNIMPLEMENTED."""

    http_status = 400
    grpc_code = "UNIMPLEMENTED"


class NotAllowed(ModelpoolError):
    """The server's settings refuse the call: the repository load/unload API under
    ``--model-control-mode`` none or poll, as Triton refuses it. HTTP 400, gRPC
    FAILED_PRECONDITION: retrying will not help, another mode would."""

    http_status = 400
    grpc_code = "FAILED_PRECONDITION"


class PayloadTooLarge(ModelpoolError):
    """The request body is over the configured limit. HTTP 413."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(ModelpoolError):
    """A transient capacity problem: waiting may help. HTTP 503 with Retry-After.

    Args:
        retry_after_s: seconds a client should wait before retrying.
    """

    http_status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ModelpoolError):
    """The deadline the client set passed before the answer was ready. HTTP 504,
    gRPC DEADLINE_EXCEEDED; no Retry-After: the client chose the time."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class RateLimited(ModelpoolError):
    """A tenant is over its request rate or its requests in flight: HTTP 429 with
    Retry-After, gRPC RESOURCE_EXHAUSTED. Only that tenant waits; the pool is fine.

    Args:
        retry_after_s: seconds until the tenant may send again.
    """

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaExceeded(RateLimited):
    """A tenant's private models would hold more device memory than its quota, and
    none of its own copies can make room now: HTTP 429 with Retry-After (its busy
    copies may go idle), gRPC RESOURCE_EXHAUSTED."""


class DoesNotFit(ModelpoolError):
    """The model is larger than any device could ever hold. HTTP 503, no Retry-After:
    waiting will not help. gRPC RESOURCE_EXHAUSTED."""

    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"


class ModelLoadError(ModelpoolError):
    """The model's artifact could not be loaded (corrupt or missing file). HTTP 400 for
    the request that triggered it, gRPC FAILED_PRECONDITION; the model is marked failed
    with this reason until its file changes."""

    http_status = 400
    grpc_code = "FAILED_PRECONDITION"


class InferenceError(ModelpoolError):
    """The model raised while computing. HTTP 400: the input drove it there, and the
    worker survives."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class OutOfMemory(Unavailable):
    """A load or a request ran out of device memory. The copy is released; placement
    may try elsewhere with a larger reservation. HTTP 503 with Retry-After."""


class WorkerUnavailable(Unavailable):
    """The worker holding the copy went away mid-request."""


class ResidencyStoreError(Unavailable):
    """The residency store (Redis) cannot be reached; warm routes keep working."""


class RepositoryUnavailable(Unavailable):
    """A remote model repository (S3) cannot be read: an outage, refused credentials.
    Models read before keep serving; an artifact not yet cached cannot load."""
