"""A gateway's local mirror of the measured footprints in the residency store.

Fed like ``cache.view.ResidencyView``: by the store's events (``FootprintPut``, and
``Resynced`` on every (re)connect) and by the start-up snapshot, so planning reads a
dict and never waits on Redis. What placement asks for is one figure per model
version: the measurement on the kinds of device the pool has now.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from modelpool.cache.records import (
    Footprint,
    FootprintPut,
    Resynced,
    StoreEvent,
    device_kind,
)
from modelpool.cache.store import ResidencyStore
from modelpool.cache.view import ResidencyView
from modelpool.placement.errors import ModelpoolError

log = logging.getLogger(__name__)


class FootprintBook:
    """Measured footprints by model version and device kind, plus this gateway's own
    guesses (a load that ran out of memory asks for more next time; a guess is not a
    measurement, so it stays local and the next measurement replaces it)."""

    def __init__(self, store: ResidencyStore, view: ResidencyView) -> None:
        self.store = store
        self.view = view
        self._by_model: dict[tuple[str, int], dict[str, Footprint]] = {}
        #: (model, version) -> (bytes, seconds) to plan with until the next measurement.
        self._guesses: dict[tuple[str, int], tuple[int, float]] = {}
        store.subscribe(self.apply)

    def apply(self, event: StoreEvent) -> None:
        match event:
            case FootprintPut(footprint=f):
                self.put(f)
            case Resynced(footprints=footprints):
                self.load(footprints)

    def load(self, footprints: Iterable[Footprint]) -> None:
        """Merge a snapshot's measurements (start-up, reconnect): a store that came back
        empty does not make this gateway forget what it measured."""
        for f in footprints:
            known = self._by_model.get((f.model, f.version), {}).get(f.device_kind)
            if known is None or known.measured_at <= f.measured_at:
                self.put(f)

    def put(self, footprint: Footprint) -> None:
        key = (footprint.model, footprint.version)
        self._by_model.setdefault(key, {})[footprint.device_kind] = footprint
        self._guesses.pop(key, None)

    def guess(self, model: str, version: int, need_bytes: int, load_seconds: float) -> None:
        """Plan ``model`` with ``need_bytes`` until a load measures it."""
        self._guesses[(model, version)] = (need_bytes, load_seconds)

    async def share(self, footprint: Footprint) -> None:
        """Write a measurement to the store for every gateway. A store outage costs
        only the sharing: this gateway already plans with it (``put``)."""
        try:
            await self.store.record_footprint(footprint)
        except ModelpoolError as e:
            log.warning(
                "footprint of model=%s version=%d not shared: %s",
                footprint.model, footprint.version, e,
            )  # fmt: skip

    def of(self, model: str, version: int) -> list[Footprint]:
        return sorted(
            self._by_model.get((model, version), {}).values(), key=lambda f: f.device_kind
        )

    def all(self) -> list[Footprint]:
        return [f for key in sorted(self._by_model) for f in self.of(*key)]

    def get(self, key: tuple[str, int]) -> tuple[int, float] | None:
        """(peak bytes, load seconds) to plan ``key`` = (model, version) with, None when
        nothing was measured. The largest measurement on a kind of device the pool has
        now; a measurement on another kind (a CPU load priced for a GPU pool) still beats
        a guess from the file size."""
        guess = self._guesses.get(key)
        if guess is not None:
            return guess
        measured = self._by_model.get(key)
        if not measured:
            return None
        kinds = {device_kind(w.device_id) for w in self.view.workers.values()}
        here = [f for kind, f in measured.items() if kind in kinds] or list(measured.values())
        return max(f.peak_bytes for f in here), max(f.load_seconds for f in here)
