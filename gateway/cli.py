"""The ``modelpool`` command: serve, worker, examples."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from modelpool.gateway.config import GatewayConfig
from modelpool.placement.units import parse_size

log = logging.getLogger("modelpool")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_repository_args(p: argparse.ArgumentParser) -> None:
    """The artifact cache and S3 flags, shared by serve, gateway and worker."""
    p.add_argument(
        "--repository-cache",
        default=None,
        metavar="DIR",
        help="where artifacts of a remote (s3://) repository are cached on this host "
        "(default: $XDG_CACHE_HOME/modelpool/repository)",
    )
    p.add_argument(
        "--repository-cache-size",
        type=_size,
        default=20 << 30,
        metavar="SIZE",
        help="the cache's size; least recently used artifacts go first (default 20GiB)",
    )
    p.add_argument(
        "--s3-endpoint-url",
        default=None,
        metavar="URL",
        help="S3-compatible endpoint, e.g. MinIO's (default: AWS_ENDPOINT_URL, else AWS)",
    )
    p.add_argument(
        "--s3-region",
        default=None,
        metavar="REGION",
        help="default: AWS_REGION / AWS_DEFAULT_REGION",
    )


def _repository_settings(args: argparse.Namespace):
    from modelpool.gpu.sources import RepositorySettings

    return RepositorySettings(
        cache_dir=args.repository_cache,
        cache_bytes=args.repository_cache_size,
        s3_endpoint_url=args.s3_endpoint_url,
        s3_region=args.s3_region,
    )


def _add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-repository",
        required=True,
        help="Triton-layout model repository: a directory, or s3://bucket/prefix (docs/lifecycle.md)",
    )
    _add_repository_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1); another needs --auth-config or --insecure",
    )
    p.add_argument(
        "--auth-config",
        default=None,
        metavar="FILE",
        help="tenants, their key hashes and the models they see (YAML; see docs/security.md); "
        "reloaded on SIGHUP and when the file changes. Without it the server is open",
    )
    p.add_argument(
        "--routing",
        default=None,
        metavar="FILE",
        help="aliases and canary splits: public model names -> weighted targets (YAML; see "
        "docs/lifecycle.md); reloaded on SIGHUP and when the file changes",
    )
    p.add_argument(
        "--auth-reload-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the auth config file is checked for changes (default 1; 0: only on SIGHUP)",
    )
    p.add_argument(
        "--audit-log",
        default=None,
        metavar="FILE",
        help="append a JSON line per admin action (load, unload, status) and refused "
        "credential (401/403) to FILE (default: none)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a --host other than loopback without --auth-config (an open server)",
    )
    _add_drain_arg(p)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--max-request-size",
        type=_size,
        default=64 << 20,
        help="largest request body (default 64MiB)",
    )
    p.add_argument(
        "--infer-timeout", type=float, default=60.0, help="seconds per forwarded request"
    )
    p.add_argument("--load-timeout", type=float, default=300.0, help="seconds per model load")
    p.add_argument(
        "--acquire-timeout",
        type=float,
        default=15.0,
        help="longest a request waits for a copy (a load, or room) before a 503 with "
        "Retry-After; the load itself carries on for later requests; a shorter client "
        "deadline wins (default 15)",
    )
    p.add_argument(
        "--recycle-retained-size",
        type=_size,
        default=256 << 20,
        help="an unload that leaves more than this in a worker's allocator gets the "
        "worker restarted once drained (serve only; default 256MiB)",
    )
    p.add_argument(
        "--max-inflight-per-copy",
        type=int,
        default=32,
        help="forwards one model may have in flight per copy; past that requests queue "
        "per tenant, round-robin (default 32)",
    )
    p.add_argument(
        "--max-queue-per-model",
        type=int,
        default=1024,
        help="requests one model may have queued before a 503 with Retry-After (default 1024)",
    )
    p.add_argument(
        "--recycle-interval",
        type=float,
        default=60.0,
        help="least seconds between two worker recycles on one device (default 60)",
    )
    p.add_argument(
        "--min-residency",
        type=float,
        default=0.5,
        help="seconds before a new copy may be evicted by a newcomer (default 0.5; a load "
        "that has waited that long for room is not held back by it)",
    )
    p.add_argument(
        "--system-shared-memory",
        choices=["auto", "on", "off"],
        default="auto",
        help="let clients register /dev/shm regions (Triton's system shared memory): "
        "auto is on without --auth-config and off with it (default auto)",
    )
    p.add_argument(
        "--admission-window",
        type=float,
        default=0.5,
        help="longest seconds a load waits while the copies it would evict are worth more "
        "than the model; past it, the load drains and takes its victims (default 0.5; 0: "
        "load at once, never drain)",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--high-watermark",
        type=float,
        default=0.95,
        help="fraction of a device loads may fill; above it, evict (default 0.95)",
    )
    p.add_argument(
        "--low-watermark",
        type=float,
        default=0.85,
        help="pressure eviction stops here (default 0.85)",
    )
    p.add_argument(
        "--replicate-hot-rps",
        type=float,
        default=50.0,
        help="requests/s per copy above which a model gets another copy",
    )
    p.add_argument(
        "--replicate-cool-rps",
        type=float,
        default=10.0,
        help="requests/s per copy below which extra copies go",
    )
    p.add_argument(
        "--max-copies",
        type=int,
        default=4,
        help="most copies of one model; 1 turns replication off",
    )
    p.add_argument(
        "--policy",
        choices=["lru", "gdsf"],
        default="gdsf",
        help="eviction policy: gdsf (cost-aware: reload cost x decayed frequency / size; "
        "the default, chosen by measurement) or lru (classic); see docs/placement.md",
    )
    p.add_argument(
        "--model-control-mode",
        choices=["on-demand", "none", "poll", "explicit"],
        default="on-demand",
        help="on-demand (default): every model serves, loading on its first request; "
        "repository load/unload work, and an unloaded model loads again on its next "
        "request. explicit: only models loaded through the repository API or "
        "--load-model serve, and an unload sticks. poll: the repository is re-scanned "
        "every --repository-poll-secs (new versions load before they replace the old). "
        "none: as on-demand, with the repository API refused. See docs/model-control.md",
    )
    p.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="load NAME at start (repeatable; '*': every model), in any mode",
    )
    p.add_argument(
        "--repository-poll-secs",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="seconds between repository scans with --model-control-mode poll (default 15)",
    )
    p.add_argument(
        "--housekeeping-interval",
        type=float,
        default=1.0,
        help="seconds between device reads, pressure checks and replication plans",
    )


def _add_redis_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--redis-url",
        required=required,
        default=None,
        help="residency store: redis://[:password@]host:port/db or rediss:// for TLS",
    )
    p.add_argument("--redis-namespace", default="modelpool", help="key prefix in Redis")


def _node_name() -> str:
    return socket.gethostname().split(".")[0] or "local"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelpool", description="Many-model inference gateway (KServe v2 / Triton protocol)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="gateway and local workers on one machine")
    _add_gateway_args(serve)
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes per device (default 1)"
    )
    serve.add_argument(
        "--device-memory-budget",
        type=_size,
        default=None,
        help="memory models may use on each device, shared by its workers: 4GiB, 512MB or bytes "
        "(default: 2GiB on CPU, the device's memory on a GPU)",
    )
    serve.add_argument(
        "--host-memory-budget",
        type=_size,
        default=0,
        help="pinned host memory per worker for copies evicted from its device, so a "
        "reload is a host-to-device copy: 8GiB, 512MB or bytes (default 0: off; ignored on CPU)",
    )
    serve.add_argument(
        "--devices", default="auto", help="auto (CUDA if present), cpu, or cuda:0,cuda:1"
    )
    serve.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    serve.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="where serve keeps its warm-restart state, one file per model repository "
        "(default: $XDG_STATE_HOME/modelpool, else ~/.local/state/modelpool)",
    )
    serve.add_argument(
        "--no-warm-restart",
        action="store_true",
        help="start cold: neither preload the models resident before the last stop nor "
        "save them for the next start",
    )
    serve.add_argument(
        "--node",
        default=None,
        help="this machine's name in worker and device ids (default: hostname); give each "
        "serve sharing a Redis its own",
    )
    serve.add_argument(
        "--worker-host",
        default=None,
        metavar="HOST",
        help="address local workers listen on for gateways on other hosts (default: --host "
        "with --redis-url, else 127.0.0.1); the local gateway dials their Unix sockets",
    )
    serve.add_argument(
        "--advertise-host",
        default=None,
        metavar="HOST",
        help="host other machines dial to reach the local workers, registered in Redis "
        "(default: --worker-host, or this host's name when that is 0.0.0.0)",
    )
    _add_redis_args(serve, required=False)

    gateway = sub.add_parser("gateway", help="a gateway replica over workers registered in Redis")
    _add_gateway_args(gateway)
    _add_redis_args(gateway, required=True)

    worker = sub.add_parser("worker", help="one worker process hosting many models on a device")
    worker.add_argument("--model-repository", required=True)
    _add_repository_args(worker)
    worker.add_argument("--device", default="cpu", help="cpu or cuda:N")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    worker.add_argument("--device-memory-budget", type=_size, default=None)
    worker.add_argument(
        "--host-memory-budget",
        type=_size,
        default=0,
        help="pinned host memory per worker for copies evicted from its device, so a "
        "reload is a host-to-device copy: 8GiB, 512MB or bytes (default 0: off; ignored on CPU)",
    )
    worker.add_argument("--worker-id", default=None)
    worker.add_argument("--advertise", default=None, help="HOST:PORT gateways should dial")
    worker.add_argument(
        "--unix-socket", default=None, help="also listen here; advertised unless --advertise"
    )
    worker.add_argument("--threads", type=int, default=None)
    worker.add_argument("--max-message-size", type=_size, default=1 << 30)
    worker.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--log-level", default="INFO")
    worker.add_argument("--node", default=None, help="node name in device ids (default: hostname)")
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /metrics, /v2/health/live and /v2/health/ready over HTTP on PORT (0: any "
        "free port; default: none)",
    )
    _add_drain_arg(worker)
    _add_redis_args(worker, required=False)

    status = sub.add_parser("status", help="workers, devices and resident models of a gateway")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's REST address")
    status.add_argument(
        "--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS"
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument(
        "--key",
        default=os.environ.get("MODELPOOL_KEY"),
        help="an admin key, for a gateway with --auth-config (default: $MODELPOOL_KEY)",
    )

    keys = sub.add_parser("keys", help="API keys for the auth config")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_new = keys_sub.add_parser(
        "new", help="print a fresh random key and the hash line for the auth config"
    )
    keys_new.add_argument("--tenant", required=True, help="the tenant the key is for")

    from modelpool.gateway import route_cli

    route_cli.add_parser(sub)

    examples = sub.add_parser("examples", help="write the example model repository")
    examples.add_argument("--out", required=True)
    examples.add_argument("--count", type=int, default=8)
    examples.add_argument("--seed", type=int, default=0)
    examples.add_argument("--large", action="store_true", help="include models of a few hundred MB")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "examples":
        from modelpool.gpu.examples import main as examples_main

        forwarded = ["--out", args.out, "--count", str(args.count), "--seed", str(args.seed)]
        return examples_main(forwarded + (["--large"] if args.large else []))
    if args.command == "status":
        from modelpool.gateway.status_view import run

        try:
            return run(args.url, args.watch, args.json, key=args.key)
        except KeyboardInterrupt:
            return 0
    if args.command == "route":
        from modelpool.gateway import route_cli

        return route_cli.run(args)
    if args.command == "keys":
        return _keys_new(args.tenant)
    _setup_logging(args.log_level)
    try:
        if args.command == "worker":
            return _run_worker(args)
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "gateway":
            return asyncio.run(_gateway(args))
    except (ValueError, RuntimeError) as e:
        print(f"modelpool {args.command}: {e}", file=sys.stderr)
        return 2
    return 1


def _keys_new(tenant: str) -> int:
    """``modelpool keys new --tenant NAME``: the key for the client (shown once, stored
    nowhere) and the hash for the auth config, as a YAML mapping on stdout."""
    from modelpool.gateway.tenants import check_tenant_name, hash_key, new_key

    try:
        check_tenant_name(tenant)
    except ValueError as e:
        print(f"modelpool keys new: {e}", file=sys.stderr)
        return 2
    key = new_key()
    print(f"tenant: {tenant}")
    print(f"key: {key}")
    print(f"hash: {hash_key(key)}")
    print(
        f"Give the key to tenant '{tenant}' (it is not stored anywhere); add the hash to "
        "its keys: in the auth config, then reload (SIGHUP, or wait a second).",
        file=sys.stderr,
    )
    return 0


def _add_drain_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM: not ready at once, new requests refused (503), accepted ones "
        "given this long to finish before the process leaves the registry and exits "
        "(default 30)",
    )


def _install_signals(stop: asyncio.Event, reload: Callable[[], None]) -> None:
    """SIGINT/SIGTERM stop; SIGHUP re-reads the auth config (and the routing file)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)


def _run_worker(args: argparse.Namespace) -> int:
    from modelpool.gpu.worker import WorkerConfig, serve_worker

    budget = args.device_memory_budget
    if args.device == "cpu" and budget is None:
        budget = 2 << 30
    config = WorkerConfig(
        model_repository=args.model_repository,
        repository_settings=_repository_settings(args),
        device=args.device,
        host=args.host,
        port=args.port,
        device_memory_budget=budget,
        worker_id=args.worker_id,
        threads=args.threads,
        max_message_bytes=args.max_message_size,
        advertise=args.advertise,
        unix_socket=args.unix_socket,
        drain_timeout_s=args.drain_timeout,
        metrics_port=args.metrics_port,
        host_memory_budget=args.host_memory_budget,
    )
    companion = None
    if args.redis_url:
        companion = _announce_to(args.redis_url, args.redis_namespace, args.node or _node_name())
    asyncio.run(serve_worker(config, exit_with_parent=args.exit_with_parent, companion=companion))
    return 0


def _announce_to(url: str, namespace: str, node: str):
    """Registers the worker in Redis, heartbeats, re-announces its copies when needed."""
    from modelpool.cache.announce import Announcer
    from modelpool.cache.records import CopyState, CopyView, WorkerRecord
    from modelpool.cache.redis_store import RedisStore

    async def run(worker, address: str) -> None:
        store = RedisStore(url, namespace=namespace)
        record = WorkerRecord(
            worker_id=worker.worker_id,
            address=address,
            device_id=f"{node}/{worker.config.device}",
            node=node,
            pid=os.getpid(),
        )

        def held() -> list[CopyView]:
            return [
                CopyView(m.spec.name, m.version, worker.worker_id, CopyState.READY, m.footprint_bytes,
                         m.last_used, m.loaded_at)
                for m in list(worker.runtime.models.values())
            ]  # fmt: skip

        try:
            await Announcer(store, record, held).run()
        except asyncio.CancelledError:
            # Drain: the copies leave the registry before the worker stops serving
            # them, so gateways route elsewhere at once rather than after a timeout.
            try:
                async with asyncio.timeout(5.0):
                    await store.remove_worker(worker.worker_id)
                log.info("worker %s left the registry", worker.worker_id)
            except Exception as e:  # Redis down: its heartbeat lapses instead
                log.warning("worker %s could not leave the registry: %s", worker.worker_id, e)
            raise
        finally:
            await store.close()

    return run


async def _serve(args: argparse.Namespace) -> int:
    from modelpool.gateway.server import Gateway, ready_line
    from modelpool.gateway.supervisor import (
        LocalWorkers,
        SupervisorConfig,
        detect_devices,
        local_slots,
    )

    config = _gateway_config(args)
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    devices = detect_devices() if args.devices == "auto" else args.devices.split(",")
    node = args.node or _node_name()
    slots = local_slots(node, devices, args.workers)
    worker_host = args.worker_host or (args.host if args.redis_url else "127.0.0.1")
    budget = args.device_memory_budget
    if budget is None and "cpu" in devices:
        budget = 2 << 30

    gateway = Gateway(
        config, _store(args.redis_url, args.redis_namespace), model_control=_model_control(args)
    )
    supervisor = LocalWorkers(
        SupervisorConfig(
            model_repository=gateway.repository.location,
            repository_args=tuple(config.repository_settings.worker_args()),
            node=node,
            device_memory_budget=budget,
            threads=args.threads,
            redis_url=args.redis_url,
            redis_namespace=args.redis_namespace,
            worker_host=worker_host,
            advertise_host=args.advertise_host,
            log_level=args.log_level,
            max_message_bytes=max(config.max_request_bytes, 1 << 30),
            host_memory_budget=args.host_memory_budget,
        ),
        slots,
        gateway.store,
        gateway.clients,
        gateway.metrics,
    )
    gateway.manager.recycler = supervisor.recycle
    gateway.dataplane.expected_devices = frozenset(s.device_id for s in slots)
    warm = _warm_restart(args, gateway)
    stop = asyncio.Event()
    _install_signals(stop, gateway.reload_auth)
    try:
        await supervisor.start()
        if warm is not None:
            warm.hold_ready()
        ports = await gateway.start()
        await gateway.poll_once()
        await gateway.start_models()
        if warm is not None:
            # Before the ready line and /v2/health/ready: the first requests are warm.
            await warm.preload()
            warm.start_saving()
        log.info(
            "serving %d models from %s on %s with %d worker(s) on %s",
            len(gateway.repository.names()),
            gateway.repository.location,
            config.host,
            len(slots),
            ",".join(devices),
        )
        print(ready_line(ports), flush=True)
        await stop.wait()
        log.info("shutting down")
        await gateway.drain()
    finally:
        if warm is not None:
            await warm.stop()  # while the copies are still resident
        await supervisor.stop()
        await gateway.stop()
    return 0


def _warm_restart(args: argparse.Namespace, gateway):
    """The warm-restart state of ``serve`` (None with ``--no-warm-restart``)."""
    if args.no_warm_restart:
        return None
    from pathlib import Path

    from modelpool.gateway.warm_restart import WarmRestart, default_state_dir, state_path

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    return WarmRestart(gateway, state_path(state_dir, gateway.repository.root))


def _gateway_config(args: argparse.Namespace) -> GatewayConfig:
    from modelpool.placement.pressure import Watermarks
    from modelpool.placement.replication import ReplicationConfig

    return GatewayConfig(
        model_repository=args.model_repository,
        repository_settings=_repository_settings(args),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        max_request_bytes=args.max_request_size,
        infer_timeout_s=args.infer_timeout,
        drain_timeout_s=args.drain_timeout,
        load_timeout_s=args.load_timeout,
        acquire_timeout_s=args.acquire_timeout,
        retained_limit_bytes=args.recycle_retained_size,
        recycle_interval_s=args.recycle_interval,
        max_inflight_per_copy=args.max_inflight_per_copy,
        max_queued_per_model=args.max_queue_per_model,
        min_residency_s=args.min_residency,
        admission_window_s=args.admission_window,
        system_shared_memory=args.system_shared_memory,
        watermarks=Watermarks(high=args.high_watermark, low=args.low_watermark),
        poll_interval_s=args.housekeeping_interval,
        policy=args.policy,
        auth_config=args.auth_config,
        routing=args.routing,
        auth_reload_interval_s=args.auth_reload_interval,
        audit_log=args.audit_log,
        insecure=args.insecure,
        replication=None
        if args.max_copies <= 1
        else ReplicationConfig(args.replicate_hot_rps, args.replicate_cool_rps, args.max_copies),
    )


def _model_control(args: argparse.Namespace):
    from modelpool.gateway.model_control import ControlMode, ModelControlConfig

    return ModelControlConfig(
        mode=ControlMode(args.model_control_mode),
        load_models=tuple(args.load_model),
        poll_interval_s=args.repository_poll_secs,
    )


def _store(url: str | None, namespace: str):
    if url is None:
        from modelpool.cache.store import InMemoryStore

        return InMemoryStore()
    from modelpool.cache.redis_store import RedisStore

    return RedisStore(url, namespace=namespace)


async def _gateway(args: argparse.Namespace) -> int:
    from modelpool.gateway.server import Gateway, ready_line

    gateway = Gateway(
        _gateway_config(args),
        _store(args.redis_url, args.redis_namespace),
        model_control=_model_control(args),
    )
    stop = asyncio.Event()
    _install_signals(stop, gateway.reload_auth)
    try:
        ports = await gateway.start()
        await gateway.poll_once()
        await gateway.start_models()
        log.info(
            "gateway serving %d models; %d workers registered",
            len(gateway.repository.names()),
            len(gateway.view.workers),
        )
        print(ready_line(ports), flush=True)
        await stop.wait()
        log.info("shutting down")
        await gateway.drain()
    finally:
        await gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
