"""Model control: which models may serve, and when the repository is read again.

Triton's ``--model-control-mode`` and how each mode reads here (a model "loaded" in
Triton is, in modelpool, one that may serve: its copies still come and go with
demand and device memory, which is the point of the pool):

==========  ==========================================================================
on-demand   (default; modelpool's own) every model in the repository serves; a copy
            loads on the first request. Repository load/unload work; an unloaded
            model loads again on its next request.
none        as on-demand, but the repository load/unload API is refused, as Triton
            refuses it in ``none``. Triton would load every model at start; here
            ``--load-model`` preloads.
explicit    only models loaded through the repository API (or ``--load-model`` at
            start, ``'*'`` for all) serve; an unload sticks: the model's requests get
            ModelNotReady (400 / UNAVAILABLE) until it is loaded again.
poll        every ``--repository-poll-secs`` the repository is scanned: new models,
            versions and config changes are picked up. A new version is loaded
            before it replaces the one serving, so requests keep being answered by
            the old version until the new is ready. Load/unload API refused.
==========  ==========================================================================

A repository load may carry Triton's ``parameters: {"config": "<JSON ModelConfig>"}``:
that config replaces the model's config.pbtxt (on this gateway, and on the workers,
which get it with every load of the model) until a load without one.

The set of explicitly loaded models lives in this gateway: with several gateways on
one Redis, load and unload through each (or start each with the same
``--load-model``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass, replace

from modelpool.cache.records import CopyState, CopyView
from modelpool.gateway.copies import CopyManager
from modelpool.gateway.deadlines import Deadline
from modelpool.gpu.repository import (
    ModelRepository,
    ModelSpec,
    check_model_name,
    config_from_json,
    model_not_found,
)
from modelpool.placement.errors import (
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    ModelpoolError,
    NotAllowed,
)

log = logging.getLogger(__name__)

#: ``--load-model '*'``: every model in the repository.
ALL_MODELS = "*"


class ControlMode(enum.StrEnum):
    ON_DEMAND = "on-demand"
    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


@dataclass(frozen=True)
class ModelControlConfig:
    """``load_models``: names loaded at start (``'*'``: all); ``poll_interval_s``:
    seconds between repository scans in poll mode."""

    mode: ControlMode = ControlMode.ON_DEMAND
    load_models: tuple[str, ...] = ()
    poll_interval_s: float = 15.0

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0:
            raise ValueError("--repository-poll-secs must be positive")
        for name in self.load_models:
            if name == ALL_MODELS:
                continue
            try:
                check_model_name(name)
            except InvalidInput as e:
                raise ValueError(f"--load-model: {e.message}") from None


@dataclass(frozen=True)
class _Fingerprint:
    """What a poll compares: the config, the versions and their files."""

    config: bytes
    error: str | None
    files: tuple[tuple[int, str], ...]  # (version, stamp: size and mtime, or S3's ETag)
    checksums: tuple[tuple[int, tuple[str, ...]], ...]  # declared digests (sidecars)


def _fingerprint(spec: ModelSpec) -> _Fingerprint:
    # The stamps the scan recorded: an S3 repository's artifacts are not on disk.
    files = tuple((v, spec.stamps.get(v, "")) for v in sorted(spec.artifacts))
    sums = tuple(
        (v, tuple(d.digest for d in spec.checksums.get(v, ()))) for v in sorted(spec.artifacts)
    )
    config = spec.config.SerializeToString(deterministic=True)
    return _Fingerprint(config, spec.error, files, sums)


def _same_config(a: ModelSpec, b: ModelSpec) -> bool:
    det = {"deterministic": True}
    return a.config.SerializeToString(**det) == b.config.SerializeToString(**det)


class ModelControl:
    """The repository API (load, unload) and the mode's rules for one gateway.

    Owns: the explicitly loaded models, the poll task, the models whose copies were
    loaded under a config since changed (``_stale``: unloaded as they go idle).
    Residency stays the copy manager's: this asks it (``acquire``, ``unload_model``,
    ``evict``) and gates its loads through ``load_gate``.
    """

    def __init__(
        self,
        config: ModelControlConfig,
        repository: ModelRepository,
        manager: CopyManager,
        *,
        load_timeout_s: float,
        unload_timeout_s: float,
    ) -> None:
        self.config = config
        self.repository = repository
        self.manager = manager
        self.load_timeout_s = load_timeout_s
        self.unload_timeout_s = unload_timeout_s
        self._loaded: set[str] = set()
        self._fingerprints: dict[str, _Fingerprint] = {}
        #: Model -> (wall time of a config change, the versions served before it):
        #: copies of those versions loaded before then go once idle.
        self._stale: dict[str, tuple[float, frozenset[int]]] = {}
        self._poller: asyncio.Task[None] | None = None
        if config.mode == ControlMode.EXPLICIT:
            if ALL_MODELS in config.load_models:
                self._loaded.update(repository.names())
            else:
                self._loaded.update(config.load_models)
            manager.load_gate = self.check_loadable

    @property
    def mode(self) -> ControlMode:
        return self.config.mode

    # -- what may serve ----------------------------------------------------------------
    def is_loaded(self, name: str) -> bool:
        return self.mode != ControlMode.EXPLICIT or name in self._loaded

    def check_loadable(self, name: str) -> None:
        """Raise for a model explicit mode keeps unloaded (the copy manager's gate).

        Raises:
            ModelNotReady: 400 / UNAVAILABLE, as Triton answers for an unloaded model.
        """
        if not self.is_loaded(name):
            raise ModelNotReady(
                f"model '{name}' is not loaded (--model-control-mode explicit): load it "
                f"with POST /v2/repository/models/{name}/load"
            )

    def unloaded_reason(self, name: str) -> str:
        """The repository index's reason for a model with no copy."""
        if self.is_loaded(name):
            return "unloaded: loads on first request"
        return "unloaded: load it through the repository API (--model-control-mode explicit)"

    def refresh_index(self) -> None:
        """Re-read the repository for the index. In explicit and poll modes a served
        model changes only through a load or a poll; the index only learns of new
        models."""
        if self.mode in (ControlMode.ON_DEMAND, ControlMode.NONE):
            self.repository.refresh()
            return
        for name, spec in self.repository.scan().items():
            if name not in self.repository:
                self.repository.install(name, spec)

    def _check_api(self, action: str) -> None:
        if self.mode in (ControlMode.NONE, ControlMode.POLL):
            raise NotAllowed(
                f"repository {action} is not allowed with --model-control-mode "
                f"{self.mode} (use explicit or on-demand)"
            )

    # -- repository API ----------------------------------------------------------------
    async def load(self, name: str, config_json: str | None = None) -> None:
        """Triton's load: read the model again (from ``config_json``, a JSON
        ModelConfig, when given), forget a past failure, load every version its policy
        serves. Copies loaded under a different config are unloaded first.

        Raises:
            NotAllowed: the mode (none, poll) refuses the repository API.
            InvalidInput: ``config_json`` is not a valid config for the model.
            ModelNotFound: no such model.
            ModelNotReady: its config.pbtxt is broken.
        """
        self._check_api("load")
        check_model_name(name)
        override = config_from_json(name, config_json) if config_json is not None else None
        previous_override = self.repository.override(name)
        self.repository.set_override(name, override)
        spec = self.repository.read(name)
        if spec is None or spec.error is not None:
            self.repository.set_override(name, previous_override)
            if spec is None:
                raise model_not_found(name)
            assert spec.error is not None
            if override is not None:
                raise InvalidInput(f"model '{name}': the load request's config: {spec.error}")
            raise ModelNotReady(f"model '{name}' is not available: {spec.error}")
        previous = self.repository.get(name) if name in self.repository else None
        self.repository.install(name, spec)
        self._fingerprints[name] = _fingerprint(spec)
        if previous is not None and not _same_config(previous, spec):
            # Same keys (model, version, worker): the old copies must go before copies
            # with the new config can load.
            await self.manager.unload_model(
                name, Deadline.after(self.unload_timeout_s, client_set=False)
            )
        was_loaded = name in self._loaded
        self._loaded.add(name)
        try:
            for v in spec.versions:
                self.manager.failures.pop((name, v), None)
                await self._warm(name, v)
        except ModelLoadError:
            if not was_loaded and self.mode == ControlMode.EXPLICIT:
                self._loaded.discard(name)
            raise

    async def unload(self, name: str) -> None:
        """Triton's unload: every copy goes once its requests finish. In explicit mode
        the model stays unloaded until loaded again.

        Raises:
            NotAllowed: the mode (none, poll) refuses the repository API.
            ModelNotFound: no such model.
        """
        self._check_api("unload")
        check_model_name(name)
        known = name in self.repository or name in self._loaded
        if not known:
            self.repository.get(name)  # raises ModelNotFound for unknown names
        # First, so that no request starts a new copy while the old ones go.
        self._loaded.discard(name)
        count = await self.manager.unload_model(
            name, Deadline.after(self.unload_timeout_s, client_set=False)
        )
        if count == 0 and name not in self.repository:
            raise model_not_found(name)

    async def _warm(self, name: str, version: int) -> None:
        lease = await self.manager.acquire(
            name, version, Deadline.after(self.load_timeout_s, client_set=False)
        )
        self.manager.release(lease)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Load the ``--load-model`` models (a failure is logged: one broken model
        never stops the server), then poll in poll mode. Call once workers are up.

        Raises:
            ValueError: a ``--load-model`` name is not in the repository.
        """
        names = (
            self.repository.names()
            if ALL_MODELS in self.config.load_models
            else list(dict.fromkeys(self.config.load_models))
        )
        for name in names:
            if name not in self.repository:
                with contextlib.suppress(ModelpoolError):
                    self.repository.get(name)
            if name not in self.repository:
                raise ValueError(f"--load-model {name}: not in the model repository")
        for name in names:
            spec = self.repository.get(name)
            if spec.error is not None:
                log.warning("--load-model %s: not loaded: %s", name, spec.error)
                continue
            for v in spec.versions:
                try:
                    await self._warm(name, v)
                except ModelpoolError as e:
                    log.warning("--load-model %s version %d: not loaded: %s", name, v, e)
        if self.mode == ControlMode.POLL:
            for spec in self.repository.specs():
                self._fingerprints[spec.name] = _fingerprint(spec)
            self._poller = asyncio.create_task(self._poll(), name="repository-poller")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    # -- poll mode ---------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except ModelpoolError as e:  # an unreachable S3 repository: models stand
                log.warning("repository poll failed: %s", e)
            except Exception:
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Scan the repository and apply what changed: models added and removed, new
        versions (loaded before they replace the serving ones, where the model is
        resident), new configs (copies under the old one go once idle). A model whose
        new config is broken keeps serving the old one."""
        scanned = self.repository.scan()
        for name in [n for n in self.repository.names() if n not in scanned]:
            log.info("repository poll: model %s removed", name)
            self.repository.install(name, None)
            self._fingerprints.pop(name, None)
            self._stale.pop(name, None)
        for name, new in scanned.items():
            fp = _fingerprint(new)
            if self._fingerprints.get(name) == fp:
                continue
            self._fingerprints[name] = fp
            old = self.repository.get(name) if name in self.repository else None
            if old is None or old.error is not None:
                log.info("repository poll: model %s %s", name, "added" if old is None else "read")
                self.repository.install(name, new)
            elif new.error is not None:
                log.warning(
                    "repository poll: model %s keeps its previous config: %s", name, new.error
                )
            else:
                await self._replace(old, new)
        await self._retire_stale()

    async def _replace(self, old: ModelSpec, new: ModelSpec) -> None:
        name = new.name
        added = [v for v in new.versions if v not in old.versions]
        resident = any(c.model == name for c in self.manager.view.all_copies())
        if added and resident:
            # Staged: requests still resolve to the old versions (and config), while
            # placement can already price and load the new ones.
            staged = replace(
                old,
                artifacts={**new.artifacts, **old.artifacts},
                artifact_sizes={**new.artifact_sizes, **old.artifact_sizes},
            )
            self.repository.install(name, staged)
            for v in added:
                try:
                    await self._warm(name, v)
                except ModelpoolError as e:
                    # Loadable later (or on demand); a broken file keeps the old version.
                    log.warning("repository poll: model %s version %d: %s", name, v, e)
                    if isinstance(e, ModelLoadError):
                        self.repository.install(name, old)
                        return
        changed = not _same_config(old, new)
        self.repository.install(name, new)
        log.info(
            "repository poll: model %s now serves versions %s%s",
            name, ",".join(map(str, new.versions)), " (config changed)" if changed else "",
        )  # fmt: skip
        if changed:
            self._stale[name] = (time.time(), frozenset(old.versions))

    async def _retire_stale(self) -> None:
        """Unload idle copies loaded before their model's config changed; busy ones are
        tried again next poll. Versions gone from the policy are the housekeeper's."""
        for name, (since, versions) in list(self._stale.items()):

            def stale(c: CopyView, name: str = name, since: float = since,
                      versions: frozenset[int] = versions) -> bool:  # fmt: skip
                return c.model == name and c.version in versions and c.loaded_at < since

            for c in [c for c in self.manager.view.all_copies() if stale(c)]:
                if c.state == CopyState.READY:
                    await self.manager.evict(c, reason="changed")
            if not any(stale(c) for c in self.manager.view.all_copies()):
                del self._stale[name]
