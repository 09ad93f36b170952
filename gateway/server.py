"""Wires one gateway: store, local view, copy manager, data plane, REST, gRPC, metrics,
and the housekeeper. Everything is built here and passed down; nothing is global."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from modelpool.cache.records import CopyState
from modelpool.cache.store import ResidencyStore
from modelpool.cache.view import ResidencyView
from modelpool.gateway.audit import AuditLog
from modelpool.gateway.config import GatewayConfig, is_loopback
from modelpool.gateway.copies import CopyManager, ManagerConfig
from modelpool.gateway.dataplane import DataPlane
from modelpool.gateway.fairness import FairGates
from modelpool.gateway.grpc_server import create_grpc_server
from modelpool.gateway.housekeeping import Housekeeper
from modelpool.gateway.limits import TenantLimiter
from modelpool.gateway.metrics import Metrics
from modelpool.gateway.model_control import ModelControl, ModelControlConfig
from modelpool.gateway.rest import create_rest_app
from modelpool.gateway.routing import Router, repository_check
from modelpool.gateway.shm import SharedMemoryRegistry
from modelpool.gateway.tenancy import Quotas, gateway_id, wire
from modelpool.gateway.tenants import Authenticator
from modelpool.gateway.workers import WorkerClients
from modelpool.gpu import tracing
from modelpool.gpu.repository import ModelRepository
from modelpool.placement.policies import make_policy

log = logging.getLogger(__name__)


@dataclass
class BoundPorts:
    http: int = 0
    grpc: int = 0
    metrics: int = 0


@dataclass
class Gateway:
    config: GatewayConfig
    store: ResidencyStore
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    #: How long start() waits for a shared store before giving up.
    store_connect_timeout_s: float = 15.0
    #: --model-control-mode and its flags (``gateway/model_control.py``).
    model_control: ModelControlConfig = field(default_factory=ModelControlConfig)

    def __post_init__(self) -> None:
        self.repository = ModelRepository(
            self.config.model_repository, self.config.repository_settings
        )
        # A bad auth config fails here, before anything starts (AuthConfigError).
        self.authenticator = Authenticator(self.config.auth_config)
        self.audit = AuditLog(self.config.audit_log)
        # Likewise a bad routing file (RoutingError), or one naming a missing model.
        self.router = Router(
            self.config.routing, repository_check(lambda m: self.repository.get(m).versions)
        )
        # The manager subscribes the view to the store: it owns what follows from events.
        self.view = ResidencyView()
        self.clients = WorkerClients(max_message_bytes=max(self.config.max_request_bytes, 1 << 30))
        self.metrics = Metrics(self.registry)
        cfg = self.config
        # Tenancy beyond auth: limits per tenant, quotas per private model; both follow
        # every reload of the auth config.
        self.limiter = TenantLimiter()
        self.quotas = Quotas()
        wire(self.authenticator.config, self.limiter, self.quotas)
        self.authenticator.listeners.append(lambda c: wire(c, self.limiter, self.quotas))
        self.manager = CopyManager(
            self.repository,
            self.store,
            self.view,
            self.clients,
            self.metrics,
            ManagerConfig(
                load_timeout_s=cfg.load_timeout_s,
                unload_timeout_s=min(cfg.load_timeout_s, 60.0),
                placement_timeout_s=max(cfg.placement_timeout_s, cfg.acquire_timeout_s),
                min_residency_s=cfg.min_residency_s,
                admission_window_s=cfg.admission_window_s,
                watermarks=cfg.watermarks,
                retained_limit_bytes=cfg.retained_limit_bytes,
                recycle_interval_s=cfg.recycle_interval_s,
                drain_timeout_s=cfg.infer_timeout_s,
            ),
            policy=make_policy(cfg.policy),
            quota_of=self.quotas.quota_of,
        )
        self.housekeeper = Housekeeper(
            self.store,
            self.view,
            self.clients,
            self.manager,
            replication=cfg.replication,
            min_residency_s=cfg.min_residency_s,
            limiter=self.limiter,
            gateway_id=gateway_id(),
            poll_interval_s=cfg.poll_interval_s,
        )
        per_copy = cfg.max_inflight_per_copy
        self.gates = FairGates(
            lambda model, version: per_copy * max(1, self.manager.routable_count(model, version)),
            cfg.max_queued_per_model,
        )
        self.control = ModelControl(
            self.model_control,
            self.repository,
            self.manager,
            load_timeout_s=max(cfg.load_timeout_s, cfg.acquire_timeout_s),
            unload_timeout_s=cfg.infer_timeout_s,
        )
        self.dataplane = DataPlane(
            self.repository,
            self.view,
            self.manager,
            self.metrics,
            infer_timeout_s=cfg.infer_timeout_s,
            acquire_timeout_s=cfg.acquire_timeout_s,
            authenticator=self.authenticator,
            audit=self.audit,
            limiter=self.limiter,
            gates=self.gates,
            control=self.control,
            router=self.router,
            shm=SharedMemoryRegistry(
                enabled=cfg.system_shared_memory == "on"
                or (cfg.system_shared_memory == "auto" and cfg.auth_config is None)
            ),
        )
        self.ports = BoundPorts()
        self._runners: list[web.AppRunner] = []
        self._grpc: grpc.aio.Server | None = None
        self._poller: asyncio.Task[None] | None = None
        self._auth_watcher: asyncio.Task[None] | None = None
        self._route_watcher: asyncio.Task[None] | None = None

    async def start(self) -> BoundPorts:
        snap = await self.store.snapshot()
        self.view.reset(snap.workers, snap.devices, snap.copies)
        # Measured sizes outlive gateways (Redis): a restarted one plans with them.
        self.manager.measured.load(snap.footprints)
        await self.store.start()
        # OpenTelemetry: off unless the OTEL_* environment asks (gpu/tracing.py).
        self.dataplane.tracing = tracing.from_env("gateway", os.environ)
        cfg = self.config
        rest = create_rest_app(self.dataplane, cfg.max_request_bytes)
        self.ports.http = await self._serve_aiohttp(rest, cfg.http_port)
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", self._metrics_handler)
        self.ports.metrics = await self._serve_aiohttp(metrics_app, cfg.metrics_port)
        server, self.ports.grpc = create_grpc_server(
            self.dataplane, f"{cfg.host}:{cfg.grpc_port}", cfg.max_request_bytes
        )
        await server.start()
        self._grpc = server
        self._poller = asyncio.create_task(self._poll_devices(), name="device-poller")
        self._log_auth()
        if self.authenticator.enabled and cfg.auth_reload_interval_s > 0:
            self._auth_watcher = asyncio.create_task(
                self.authenticator.watch(cfg.auth_reload_interval_s), name="auth-watcher"
            )
        if self.router.path is not None and cfg.auth_reload_interval_s > 0:
            self._route_watcher = asyncio.create_task(
                self.router.watch(cfg.auth_reload_interval_s), name="route-watcher"
            )
        return self.ports

    def reload_auth(self) -> None:
        """Re-read the auth config and the routing file now (SIGHUP); a bad file keeps
        the old config or routes."""
        self.authenticator.reload()
        if self.router.path is not None:
            self.router.reload()

    def _log_auth(self) -> None:
        cfg = self.config
        config = self.authenticator.config
        if config is not None:
            log.info(
                "auth on: %d tenants, %d keys from %s (reloaded on SIGHUP%s)",
                len(config.tenants),
                len(config.keys),
                cfg.auth_config,
                " and when the file changes" if cfg.auth_reload_interval_s > 0 else "",
            )
        elif is_loopback(cfg.host):
            log.info(
                "no --auth-config: serving open (every model and admin call, no keys) on "
                "%s only; pass --auth-config FILE to serve other hosts",
                cfg.host,
            )
        else:
            log.warning(
                "no --auth-config and --insecure: serving open on %s; anyone who can "
                "reach it may use every model and the admin calls",
                cfg.host,
            )

    async def _serve_aiohttp(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        self.refresh_gauges()
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def refresh_gauges(self) -> None:
        copies = self.manager.copies()
        self.metrics.resident_models.set(sum(1 for c in copies if c.state == CopyState.READY))
        self.metrics.workers.set(len(self.view.workers))
        connected = getattr(self.store, "connected", None)  # RedisStore's listener
        self.metrics.store_up.set(1 if connected is None or connected.is_set() else 0)
        for d in self.view.devices.values():
            workers = {
                w.worker_id for w in self.view.workers.values() if w.device_id == d.device_id
            }
            mine = [c for c in copies if c.worker_id in workers]
            reserved = sum(c.footprint_bytes for c in mine if c.state == CopyState.LOADING)
            ours = sum(
                c.footprint_bytes for c in mine if c.state in (CopyState.READY, CopyState.UNLOADING)
            )
            # Used is what occupies our share: our copies and others' memory in it.
            used = ours + d.other_bytes
            for kind, value in (
                ("total", d.total_bytes),
                ("used", used),
                ("free", max(0, d.total_bytes - used - reserved)),
                ("reserved", reserved),
                ("ours", ours),
            ):
                self.metrics.device_memory.labels(d.device_id, kind).set(value)
            # Zero from the start, so that a first restart is an increase to alert on.
            self.metrics.worker_restarts.labels(d.device_id)
            for state in (CopyState.LOADING, CopyState.READY, CopyState.UNLOADING):
                n = sum(1 for c in mine if c.state == state)
                self.metrics.device_copies.labels(d.device_id, state.value.lower()).set(n)
            occupancy = (used + reserved) / d.total_bytes if d.total_bytes > 0 else 0.0
            self.metrics.device_occupancy.labels(d.device_id).set(occupancy)

    async def _poll_devices(self) -> None:
        # tick() contains each step's errors; this guard keeps the loop alive even
        # through a bug in tick itself.
        while True:
            try:
                await self.housekeeper.tick()
            except Exception:
                log.exception("housekeeping failed")
            await asyncio.sleep(self.config.poll_interval_s)

    async def start_models(self) -> None:
        """``--load-model`` loads and, in poll mode, the repository poller; once the
        workers are up and devices read (after ``poll_once``)."""
        await self.control.start()

    async def poll_once(self) -> None:
        await self.housekeeper.refresh_devices()

    async def drain(self) -> None:
        """SIGTERM: not ready and new requests refused at once; accepted ones finish
        (``--drain-timeout``); then this gateway leaves the store's gateway set, so
        the others take over its share of tenant limits now. ``stop`` follows."""
        drain = self.dataplane.drain
        drain.begin()
        self.metrics.draining.set(1)
        log.info(
            "draining: not ready, refusing new requests; %d in flight, up to %.0fs",
            drain.active,
            self.config.drain_timeout_s,
        )
        if await drain.wait_idle(self.config.drain_timeout_s):
            log.info("drained: every accepted request answered")
        if self.housekeeper.gateway_id:
            try:
                async with asyncio.timeout(2.0):
                    await self.store.gateway_leave(self.housekeeper.gateway_id)
            except Exception as e:  # the store down: the heartbeat lapses instead
                log.warning("could not leave the gateway set: %s", e)

    async def stop(self) -> None:
        for task in (self._poller, self._auth_watcher, self._route_watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.housekeeper.close()
        await self.control.close()
        await self.manager.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.clients.close()
        await self.store.close()
        self.dataplane.shm.close()
        self.audit.close()
        if self.dataplane.tracing is not None:  # flush what is left (blocking: a thread)
            await asyncio.to_thread(self.dataplane.tracing.shutdown)


#: Parses ``ready_line``: what supervisors, tests and benchmarks wait for on stdout.
READY_RE = re.compile(r"modelpool ready http=(\d+) grpc=(\d+) metrics=(\d+)")


def ready_line(ports: BoundPorts) -> str:
    return f"modelpool ready http={ports.http} grpc={ports.grpc} metrics={ports.metrics} t={time.time():.3f}"
