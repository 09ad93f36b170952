"""Per-tenant admission: a request rate (token bucket) and requests in flight.

Checked at the edge of the data plane, before a request waits for anything, so a
tenant over its limits costs the pool nothing: it gets 429 / RESOURCE_EXHAUSTED with
Retry-After at once. The warm path stays free of I/O: buckets and counters are this
gateway's own memory.

With several gateways each enforces its share of a tenant's limits: the configured
rate, burst and concurrency divided by the number of live gateways (``share``), so a
tenant spread evenly across them gets its configured limits in all. A gateway that
knows of no others enforces the whole limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from modelpool.placement.errors import RateLimited


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one request takes one token."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be
        (nothing is taken then)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else math.inf


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; None: unlimited."""

    rate_rps: float | None = None
    burst: float | None = None
    max_concurrency: int | None = None


class Admission:
    """A request admitted under its tenant's limits: ``release`` it once it ends."""

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class TenantLimiter:
    """Admits requests per tenant name. ``share`` (0 < share <= 1) is this gateway's
    part of every limit when several gateways serve the same tenants."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._inflight: dict[str, int] = {}
        self._limits: dict[str, Limits] = {}
        self.share = 1.0
        #: Requests refused per tenant and reason (rate, concurrency), for the status view.
        self.rejections: dict[tuple[str, str], int] = {}

    def configure(self, limits: dict[str, Limits], share: float | None = None) -> None:
        """New limits (a reloaded auth config) or a new share; buckets keep their
        tokens where the rate did not change, so a reload never grants a fresh burst."""
        if share is not None:
            self.share = min(1.0, max(share, 1e-6))
        self._limits = dict(limits)
        for name in list(self._buckets):
            bucket = self._bucket_for(name)
            if bucket is None:
                del self._buckets[name]
            else:
                old = self._buckets[name]
                bucket.tokens = min(old.tokens, bucket.burst)
                bucket.updated = old.updated
                self._buckets[name] = bucket

    def set_share(self, share: float) -> None:
        """This gateway's part of every limit (1 / live gateways)."""
        if abs(share - self.share) > 1e-9:
            self.configure(self._limits, share)

    def _bucket_for(self, name: str) -> TokenBucket | None:
        limits = self._limits.get(name)
        if limits is None or limits.rate_rps is None:
            return None
        rate = limits.rate_rps * self.share
        burst = max(
            1.0, (limits.burst if limits.burst is not None else limits.rate_rps) * self.share
        )
        return TokenBucket(rate, burst, updated=self._clock())

    def inflight(self, name: str) -> int:
        return self._inflight.get(name, 0)

    def admit(self, name: str) -> Admission:
        """Count a request of tenant ``name`` in, or refuse it.

        Raises:
            RateLimited: over the tenant's rate (Retry-After: until a token) or its
                concurrency (Retry-After: 1 s).
        """
        limits = self._limits.get(name) or Limits()
        if limits.max_concurrency is not None:
            cap = max(1, math.floor(limits.max_concurrency * self.share))
            if self._inflight.get(name, 0) >= cap:
                self._reject(name, "concurrency")
                raise RateLimited(
                    f"tenant '{name}' has {cap} requests in flight, its limit",
                    retry_after_s=1.0,
                )
        if limits.rate_rps is not None:
            bucket = self._buckets.get(name) or self._bucket_for(name)
            assert bucket is not None  # the tenant has a rate
            self._buckets[name] = bucket
            wait = bucket.take(self._clock())
            if wait > 0:
                self._reject(name, "rate")
                raise RateLimited(
                    f"tenant '{name}' is over its rate limit of {limits.rate_rps:g} requests/s",
                    retry_after_s=max(0.001, wait),
                )
        self._inflight[name] = self._inflight.get(name, 0) + 1
        return Admission(lambda: self._done(name))

    def _done(self, name: str) -> None:
        n = self._inflight.get(name, 0) - 1
        if n <= 0:
            self._inflight.pop(name, None)
        else:
            self._inflight[name] = n

    def _reject(self, name: str, reason: str) -> None:
        self.rejections[(name, reason)] = self.rejections.get((name, reason), 0) + 1
