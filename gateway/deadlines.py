"""How long a request may take, end to end.

A request's time runs from the moment the gateway parsed it. The client may bound it
(the gRPC deadline; over REST the ``Modelpool-Timeout`` header in seconds, or Triton's
``timeout`` request parameter in microseconds); the server bounds the wait for a copy
by ``--acquire-timeout`` whatever the client asks. Whichever ends first decides what an
expiry means:

- the client's deadline passed: 504 / DEADLINE_EXCEEDED (``DeadlineExceeded``): the
  client asked for an answer by then and did not get it;
- the server's wait bound passed: 503 + Retry-After / UNAVAILABLE (``Unavailable``):
  capacity was short, and the client may try again.

Every wait and every worker call takes its timeout from ``remaining()``, so the time
already spent is always subtracted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from modelpool.placement.errors import DeadlineExceeded, ModelpoolError, Unavailable

#: Seconds a client is told to wait after a capacity timeout.
CAPACITY_RETRY_AFTER_S = 2.0


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock (``time.monotonic()`` seconds) and who set it."""

    expires_at: float
    client_set: bool

    @classmethod
    def after(cls, seconds: float, client_set: bool) -> Deadline:
        return cls(time.monotonic() + max(0.0, seconds), client_set)

    @classmethod
    def from_client(cls, client_s: float | None, server_s: float) -> Deadline:
        """The earlier of the client's timeout (None: none given) and the server's."""
        if client_s is not None and client_s <= server_s:
            return cls.after(client_s, client_set=True)
        return cls.after(server_s, client_set=False)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.expires_at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def capped(self, seconds: float) -> float:
        """The timeout for one step that may take at most ``seconds`` on its own."""
        return min(seconds, self.remaining())

    def error(self, what: str) -> ModelpoolError:
        """What a request that ran out of time while ``what`` gets."""
        if self.client_set:
            return DeadlineExceeded(f"{what}: the request's deadline passed")
        return Unavailable(f"{what}: no capacity in time", retry_after_s=CAPACITY_RETRY_AFTER_S)
