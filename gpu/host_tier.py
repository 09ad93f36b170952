"""The worker's host-RAM warm tier: copies evicted from the device, kept in host memory
so that loading them again is a host-to-device copy instead of a file read and a
deserialisation.

Pure bookkeeping: entries keyed (model, version) under a byte budget. Moving the
tensors (to pinned host memory and back) is ``gpu/runtime.py``'s job; nothing here
touches torch.

Eviction within the tier is LRU by last use, not the gateway's ``--policy``: GDSF
ranks copies by cluster-wide demand and reload cost, which the gateway has and a
worker does not. The worker sees only its own requests, and among those the least
recently used copy is the one least likely to be asked for next. A copy leaving the
tier is dropped: its next load reads the disk (the third tier).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Test hook, read once when a worker starts: turns the tier on for a CPU worker (the
#: "fake device"). Never for production; see ``gpu.runtime.ModelRuntime``.
FAKE_HOST_TIER_ENV = "MODELPOOL_FAKE_HOST_TIER"


@dataclass
class HostEntry:
    """One demoted copy. ``module``: what the runtime needs to promote it (its
    TorchScript module with host tensors); ``spec`` is the repository's ModelSpec it was
    loaded from; ``stamp`` the repository's stamp of the version then, so a version
    whose files changed since is never promoted. ``nbytes``: host bytes it holds;
    ``peak_bytes``: the device peak its first load measured; ``last_used``: epoch
    seconds of its last request on the device."""

    model: str
    version: int
    module: object
    spec: object
    stamp: Hashable
    nbytes: int
    peak_bytes: int
    last_used: float


class HostTier:
    """Demoted copies under ``budget_bytes`` of host memory. Thread-safe: unloads and
    loads run on the worker's load threads while status reads from the event loop.

    Args:
        budget_bytes: the most host bytes the tier holds; 0: the tier is off and every
            ``put`` is refused.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"host memory budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: dict[tuple[str, int], HostEntry] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def entries(self) -> list[HostEntry]:
        """The entries now, most recently used first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: -e.last_used)

    def __contains__(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._entries

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` could ever be kept (not over the budget)."""
        return self.enabled and nbytes <= self.budget_bytes

    def put(self, entry: HostEntry) -> list[HostEntry]:
        """Keep ``entry`` (replacing one of the same key), evicting the least recently
        used entries until it fits. Returns the evicted entries (the caller drops
        their tensors). Raises ValueError for an entry bigger than the whole budget:
        the caller checks ``fits`` first and drops the copy instead."""
        if not self.fits(entry.nbytes):
            raise ValueError(
                f"model '{entry.model}' version {entry.version}: {entry.nbytes} bytes do "
                f"not fit the host tier's budget of {self.budget_bytes}"
            )
        key = (entry.model, entry.version)
        evicted = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                evicted.append(old)
            used = sum(e.nbytes for e in self._entries.values())
            for victim in sorted(self._entries.values(), key=lambda e: e.last_used):
                if used + entry.nbytes <= self.budget_bytes:
                    break
                del self._entries[(victim.model, victim.version)]
                used -= victim.nbytes
                evicted.append(victim)
            self._entries[key] = entry
        for e in evicted:
            if e is not old:
                log.info(
                    "host tier: evicted model=%s version=%d bytes=%d to make room for %s",
                    e.model, e.version, e.nbytes, entry.model,
                )  # fmt: skip
        return evicted

    def take(self, model: str, version: int) -> HostEntry | None:
        """Remove and return the entry of (model, version); None if the tier has none."""
        with self._lock:
            return self._entries.pop((model, version), None)

    def drop(self, model: str, version: int | None = None) -> list[HostEntry]:
        """Remove every entry of ``model`` (of one ``version`` if given) and return them."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == model and version in (None, k[1])]
            return [self._entries.pop(k) for k in keys]
