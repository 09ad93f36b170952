"""Warm restarts of ``modelpool serve``: remember what was resident, preload it at start.

``modelpool serve`` writes a small JSON state file (every ``interval_s`` and on a
graceful stop): the models resident then, how often each was used and when last, and
what their loads measured. At the next start it preloads the hottest of them that fit
the devices' admission budget, before ``/v2/health/ready`` says ready and before the
ready line is printed, so the first requests after a restart are warm. With Redis the
measurements are in the store as well; the state file is used either way, since the
workers of ``serve`` are new processes and hold nothing after a restart.

The file is keyed by the model repository's absolute path, so two servers over
different repositories on one machine keep separate states. It is written to a
temporary file and renamed over the old one: a crash mid-write leaves the previous
state, never half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpool.cache import codec
from modelpool.cache.records import CopyState, Footprint
from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.server import Gateway
from modelpool.placement.errors import ModelpoolError

log = logging.getLogger(__name__)

#: Bumped when the file's shape changes; a file of another version is ignored.
STATE_VERSION = 1
#: How often the state is written while serving (it is written on a graceful stop too).
SAVE_INTERVAL_S = 30.0


@dataclass(frozen=True)
class ResidentModel:
    """A model version that was resident: ``uses`` requests routed to it (carried over
    restarts while it stays resident), ``last_used`` epoch seconds."""

    model: str
    version: int
    uses: int
    last_used: float


@dataclass(frozen=True)
class ServeState:
    repository: str
    saved_at: float
    models: tuple[ResidentModel, ...]
    footprints: tuple[Footprint, ...] = ()


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/modelpool``, else ``~/.local/state/modelpool``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "modelpool"


def state_path(state_dir: Path, repository: Path) -> Path:
    """The state file of a server over ``repository`` in ``state_dir``."""
    digest = hashlib.sha256(str(repository.resolve()).encode()).hexdigest()[:16]
    return state_dir / f"serve-{digest}.json"


def write_state(path: Path, state: ServeState) -> None:
    """Write atomically: a temporary file in the same folder, fsynced, renamed over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "version": STATE_VERSION,
        "repository": state.repository,
        "saved_at": state.saved_at,
        "models": [dataclasses.asdict(m) for m in state.models],
        "footprints": [dataclasses.asdict(f) for f in state.footprints],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_state(path: Path) -> ServeState | None:
    """The saved state; None when there is none, or it cannot be used (logged)."""
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("warm restart: ignoring unreadable state file %s: %s", path, e)
        return None
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        log.warning("warm restart: ignoring state file %s of another version", path)
        return None
    try:
        return ServeState(
            repository=str(raw["repository"]),
            saved_at=float(raw["saved_at"]),
            models=tuple(
                ResidentModel(
                    str(m["model"]), int(m["version"]), int(m["uses"]), float(m["last_used"])
                )
                for m in raw["models"]
            ),
            footprints=tuple(codec.footprint_from_dict(f) for f in raw.get("footprints", [])),
        )
    except (KeyError, TypeError, ValueError) as e:
        log.warning("warm restart: ignoring malformed state file %s: %s", path, e)
        return None


def choose(
    models: Sequence[ResidentModel], room: Sequence[int], need: Callable[[ResidentModel], int]
) -> list[ResidentModel]:
    """The hottest models (most uses, then most recent) that fit, each on the device
    with the most room left; a model that does not fit is skipped, smaller colder ones
    may still fit. Pure: ``room`` is bytes per device, ``need`` a model's bytes."""
    left = list(room)
    chosen = []
    for m in sorted(models, key=lambda m: (-m.uses, -m.last_used, m.model, m.version)):
        if not left:
            break
        i = max(range(len(left)), key=left.__getitem__)
        size = need(m)
        if size <= left[i]:
            left[i] -= size
            chosen.append(m)
    return chosen


class WarmRestart:
    """Saves ``gateway``'s residency to ``path`` and preloads from it at start."""

    def __init__(self, gateway: Gateway, path: Path, interval_s: float = SAVE_INTERVAL_S) -> None:
        self.gateway = gateway
        self.path = path
        self.interval_s = interval_s
        #: Uses carried from the previous run, by (model, version).
        self._carried: Counter[tuple[str, int]] = Counter()
        #: Requests counted by the manager before serving began (the preloads').
        self._baseline: Counter[tuple[str, int]] = Counter()
        self._saver: asyncio.Task[None] | None = None
        #: Set once preloading finished: only then does this run's state replace the
        #: file (a start that failed must not overwrite the last good state).
        self.serving = False

    def hold_ready(self) -> None:
        """Say not ready until ``preload`` is done (call before the gateway listens)."""
        self.gateway.dataplane.ready = False

    async def preload(self) -> list[ResidentModel]:
        """Load the hottest models of the saved state that fit; returns those loaded.
        The gateway's devices must be known (``poll_once``). Reports ready at the end,
        whatever happened: a model that fails to load is logged and skipped."""
        loaded: list[ResidentModel] = []
        try:
            state = read_state(self.path)
            if state is None:
                log.info("warm restart: no saved state at %s; starting cold", self.path)
            else:
                loaded = await self._preload(state)
        finally:
            self.gateway.dataplane.ready = True
        # Only now (not after an error): a start that failed keeps the last good state.
        self._baseline = Counter(self.gateway.manager.requests_by_model)
        self.serving = True
        return loaded

    async def _preload(self, state: ServeState) -> list[ResidentModel]:
        gw = self.gateway
        for f in state.footprints:
            # Plan with what the last run measured (into the store: every gateway sees it).
            if not gw.manager.measured.of(f.model, f.version):
                gw.manager.measured.put(f)
                await gw.manager.measured.share(f)
        names = set(gw.repository.names())
        # Explicit model control keeps unloaded models unloaded across restarts too.
        known = [m for m in state.models if m.model in names and gw.control.is_loaded(m.model)]
        self._carried = Counter({(m.model, m.version): m.uses for m in known})
        # Room is what admission allows less what is already there (``--load-model``
        # copies, or copies a shared store still knows); those models are warm anyway.
        resident = {(c.model, c.version) for c in gw.view.all_copies()}
        known = [m for m in known if (m.model, m.version) not in resident]
        device_of = {w.worker_id: w.device_id for w in gw.view.workers.values()}
        held: Counter[str] = Counter()
        for c in gw.view.all_copies():
            held[device_of[c.worker_id]] += c.footprint_bytes
        room = [gw.manager.admit_bytes(d) - held[d] for d in gw.view.devices]
        chosen = choose(known, room, lambda m: gw.manager.model_info(m.model, m.version).need_bytes)
        if not chosen:
            log.info("warm restart: nothing to preload (%d saved models)", len(state.models))
            return []
        log.info(
            "warm restart: preloading %d models (%d were resident): %s",
            len(chosen),
            len(state.models),
            ", ".join(m.model for m in chosen),
        )
        loaded = []
        # Coldest first: should the estimates be short, the eviction that follows takes
        # a cold model, not the hottest.
        for m in reversed(chosen):
            started = time.monotonic()
            deadline = Deadline.after(gw.config.acquire_timeout_s, client_set=False)
            try:
                lease = await gw.manager.acquire(m.model, m.version, deadline)
            except ModelpoolError as e:
                log.warning("warm restart: model=%s not preloaded: %s", m.model, e)
                continue
            gw.manager.release(lease)
            loaded.append(m)
            log.info(
                "warm restart: preloaded model=%s version=%d (%d/%d) in %.2fs",
                m.model, m.version, len(loaded), len(chosen), time.monotonic() - started,
            )  # fmt: skip
        return loaded

    def state(self) -> ServeState:
        """What is resident now, with uses carried over from the last run."""
        manager = self.gateway.manager
        used: dict[tuple[str, int], float] = {}
        for c in manager.copies():
            if c.state == CopyState.READY:
                key = (c.model, c.version)
                used[key] = max(used.get(key, 0.0), c.last_used)
        served = manager.requests_by_model
        models = tuple(
            ResidentModel(
                model,
                version,
                self._carried[(model, version)]
                + max(0, served[(model, version)] - self._baseline[(model, version)]),
                last,
            )
            for (model, version), last in sorted(used.items())
        )
        footprints = tuple(f for f in manager.measured.all() if (f.model, f.version) in used)
        return ServeState(
            str(self.gateway.repository.root.resolve()), time.time(), models, footprints
        )

    def save(self) -> None:
        """Write the state now, if this run got as far as serving. Never raises: a
        state that cannot be written costs the next start its warmth, nothing else."""
        if not self.serving:
            return
        try:
            state = self.state()
            write_state(self.path, state)
        except OSError as e:
            log.warning("warm restart: cannot write state file %s: %s", self.path, e)
            return
        log.debug("warm restart: saved %d resident models to %s", len(state.models), self.path)

    def start_saving(self) -> None:
        if self._saver is None:
            self._saver = asyncio.create_task(self._save_every(), name="warm-restart-saver")

    async def _save_every(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.save()

    async def stop(self) -> None:
        """Stop the periodic saves and write the final state (before workers stop)."""
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
            self._saver = None
        self.save()
