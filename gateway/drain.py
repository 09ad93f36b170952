"""Graceful drain: what a gateway or a worker does between SIGTERM and its exit.

The order is what makes a rolling restart behind a load balancer lossless:

1. readiness turns 503 at once, so the balancer (a Kubernetes Service, compose, a
   client's list of replicas) stops sending new work here;
2. work that still arrives before the balancer notices is refused with 503 /
   UNAVAILABLE and Retry-After: it was never accepted, and a client or balancer
   retries it on another replica;
3. work already accepted runs to its end, for up to ``--drain-timeout``;
4. the process leaves the registry (a worker's copies first) and exits 0.

``Drain`` is the bookkeeping of steps 1 to 3; the process's entry point does step 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from modelpool.placement.errors import Unavailable

log = logging.getLogger(__name__)

#: Seconds a refused client is told to wait: a balancer has usually dropped this
#: replica by then, and any other replica can take the request at once.
RETRY_AFTER_S = 1.0


class Drain:
    def __init__(self, what: str) -> None:
        #: "gateway" or "worker": named in refusals, so a client knows who refused.
        self.what = what
        self.draining = False
        self.began_at: float | None = None
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        """Accepted work not finished yet."""
        return self._active

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.began_at = time.monotonic()

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise Unavailable(
                f"this {self.what} is draining (shutting down); retry on another replica",
                retry_after_s=RETRY_AFTER_S,
            )

    @contextlib.contextmanager
    def accepted(self) -> Iterator[None]:
        """Hold the drain open while one piece of accepted work runs; refuses new work
        once draining began."""
        self.refuse_if_draining()
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no accepted work is left, for ``timeout_s`` at most; True when
        everything finished, False when time ran out (what is left gets cancelled by
        the shutdown that follows)."""
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "%s drain: %d request(s) still running after %.0fs (--drain-timeout); "
                "stopping anyway",
                self.what,
                self._active,
                timeout_s,
            )
            return False
        return True
