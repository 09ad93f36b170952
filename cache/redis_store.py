"""The residency store on Redis, shared by every gateway and worker of a deployment.

Key schema (version 1; ``{ns}`` is the namespace, default ``modelpool``):

==============================  ======  ===================================================
key                             type    content
==============================  ======  ===================================================
``{ns}:v1:workers``             set     ids of registered workers
``{ns}:v1:worker:{id}``         string  WorkerRecord JSON; expires unless heartbeats renew it
``{ns}:v1:copies``              hash    ``model|version|worker`` -> copy JSON (state,
                                        footprint, loaded_at, device_id)
``{ns}:v1:lastused``            hash    ``model|version|worker`` -> last use, epoch seconds
                                        (written in batches by gateways)
``{ns}:v1:devices``             hash    device id -> DeviceRecord JSON (last measurement)
``{ns}:v1:footprints``          hash    ``model|version|device kind`` -> Footprint JSON
                                        (bytes, peak, load seconds of the last load);
                                        never expires, outlives every gateway
``{ns}:v1:lock:{model}:{ver}``  string  fencing token of the load-lock holder (expires)
``{ns}:v1:fence``               string  counter the fencing tokens come from
``{ns}:v1:gateways``            zset    gateway id -> expiry (epoch seconds); live ones
                                        are counted to split tenant limits
``{ns}:v1:events``              pubsub  every change, JSON with an ``origin`` id
==============================  ======  ===================================================

Reads on the request path never come here: each gateway applies the events to its own
``ResidencyView`` and resynchronises from a snapshot whenever its subscription
(re)connects. redis-py errors are translated to ``ResidencyStoreError`` at this edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelpool.cache import codec
from modelpool.cache.records import (
    CopyKey,
    CopyRemoved,
    CopyUpserted,
    CopyView,
    DevicePut,
    DeviceRecord,
    Footprint,
    FootprintPut,
    Resynced,
    StoreEvent,
    WorkerDown,
    WorkerRecord,
    WorkerUp,
)
from modelpool.cache.store import ResidencyStore, Snapshot
from modelpool.placement.errors import ResidencyStoreError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS[1] copies hash, KEYS[2] lock key
# ARGV[1] field, ARGV[2] copy JSON, ARGV[3] device id, ARGV[4] capacity bytes,
# ARGV[5] footprint bytes, ARGV[6] fencing token ('' for none), ARGV[7] channel,
# ARGV[8] event JSON
# Returns 1 reserved, 0 does not fit, -1 the caller's lock was lost (stale holder).
RESERVE = """
if ARGV[6] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[6] then return -1 end
local used = 0
local vals = redis.call('HVALS', KEYS[1])
for i = 1, #vals do
  local c = cjson.decode(vals[i])
  if c.device_id == ARGV[3] and c.state ~= 'FAILED' then used = used + c.footprint_bytes end
end
if used + tonumber(ARGV[5]) > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 1
"""

# KEYS[1] workers set, KEYS[2] worker key, KEYS[3] copies hash, KEYS[4] lastused hash
# ARGV[1] worker id, ARGV[2] channel, ARGV[3] event JSON
# Returns the JSON of every copy removed with the worker.
REMOVE_WORKER = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
local removed = {}
local suffix = '|' .. ARGV[1]
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, -#suffix) == suffix then
    table.insert(removed, all[i + 1])
    redis.call('HDEL', KEYS[3], f)
    redis.call('HDEL', KEYS[4], f)
  end
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return removed
"""

# KEYS[1] lock key; ARGV[1] token, ARGV[2] ttl ms. Returns 1 if still ours.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS[1] lock key; ARGV[1] token. Deletes only our own lock.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Keys:
    def __init__(self, namespace: str) -> None:
        p = f"{namespace}:v1"
        self.workers = f"{p}:workers"
        self.copies = f"{p}:copies"
        self.lastused = f"{p}:lastused"
        self.devices = f"{p}:devices"
        self.footprints = f"{p}:footprints"
        self.fence = f"{p}:fence"
        self.gateways = f"{p}:gateways"
        self.events = f"{p}:events"
        self._worker = f"{p}:worker:"
        self._lock = f"{p}:lock:"

    def worker(self, worker_id: str) -> str:
        return self._worker + worker_id

    def lock(self, model: str, version: int) -> str:
        return f"{self._lock}{model}:{version}"


class RedisStore(ResidencyStore):
    """Residency on Redis.

    Args:
        url: ``redis://[:password@]host:port/db`` or ``rediss://`` for TLS (query
            options such as ``ssl_ca_certs`` pass through to redis-py).
        op_timeout_s: per-command socket timeout; a command past it raises
            ResidencyStoreError, so a stalled Redis costs a request at most this.
        heartbeat_ttl_s: a worker whose heartbeat is older than this is dead.
        lock_ttl_s: a load lock held by a crashed gateway frees itself after this;
            a live holder renews it every third of it.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "modelpool",
        op_timeout_s: float = 2.0,
        heartbeat_ttl_s: float = 5.0,
        lock_ttl_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.keys = Keys(namespace)
        self.origin = uuid.uuid4().hex
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.lock_ttl_s = lock_ttl_s
        common: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": op_timeout_s}
        try:
            self.redis = aioredis.Redis.from_url(
                url,
                socket_timeout=op_timeout_s,
                # One quick retry for a dropped connection; an outage must fail fast
                # into a 503, not queue requests behind backoff.
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
                **common,
            )
            # Subscriptions block on reads: no socket timeout, health checks instead.
            self._sub_redis = aioredis.Redis.from_url(url, health_check_interval=5, **common)
        except ValueError as e:
            raise ValueError(f"--redis-url {url!r}: {e}") from None
        self._reserve = self.redis.register_script(RESERVE)
        self._remove_worker = self.redis.register_script(REMOVE_WORKER)
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._device_of: dict[str, str] = {}
        self._listener: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    # -- error edge ------------------------------------------------------------------
    async def _io(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError) as e:
            raise ResidencyStoreError(
                f"residency store (redis) {what} failed: {e}", retry_after_s=1.0
            ) from None

    # -- events ----------------------------------------------------------------------
    async def _emit(self, event: StoreEvent, device_id: str = "") -> None:
        """Apply to this process's listeners now, then tell everyone else."""
        self._publish(event)
        await self._io(
            "publish",
            self.redis.publish(
                self.keys.events, codec.event_to_json(event, self.origin, device_id)
            ),
        )

    def _learn(self, event: StoreEvent) -> None:
        match event:
            case WorkerUp(worker=w):
                self._device_of[w.worker_id] = w.device_id
            case Resynced(workers=workers):
                self._device_of.update({w.worker_id: w.device_id for w in workers})

    def _publish(self, event: StoreEvent) -> None:
        self._learn(event)
        super()._publish(event)

    async def start(self) -> None:
        """Subscribe, resync, and keep doing so across outages with backoff."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="redis-listener")

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.events)
                # Subscribe first, then snapshot: a change landing between the two is
                # both in the snapshot and delivered, and applying it twice is harmless.
                snap = await self.snapshot()
                self._publish(
                    Resynced(
                        tuple(snap.workers),
                        tuple(snap.devices),
                        tuple(snap.copies),
                        tuple(snap.footprints),
                    )
                )
                self.connected.set()
                backoff = 0.1
                log.info(
                    "residency store: subscribed and resynced (%d workers, %d copies)",
                    len(snap.workers),
                    len(snap.copies),
                )
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        origin, event = codec.event_from_json(message["data"])
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning("residency store: ignoring malformed event: %s", e)
                        continue
                    if origin != self.origin:
                        self._publish(event)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ResidencyStoreError) as e:
                if self.connected.is_set():
                    log.warning(
                        "residency store: lost redis (%s); serving warm routes from the local view",
                        e,
                    )
                self.connected.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # -- reads -----------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        async def read() -> Snapshot:
            pipe = self.redis.pipeline(transaction=False)
            pipe.smembers(self.keys.workers)
            pipe.hgetall(self.keys.copies)
            pipe.hgetall(self.keys.devices)
            pipe.hgetall(self.keys.lastused)
            pipe.hgetall(self.keys.footprints)
            ids, copies, devices, lastused, footprints = await pipe.execute()
            ids = sorted(ids)
            records = await self.redis.mget([self.keys.worker(i) for i in ids]) if ids else []
            workers = [codec.worker_from_dict(json.loads(r)) for r in records if r]
            alive = {w.worker_id for w in workers}
            out = []
            for field, raw in copies.items():
                c = codec.copy_from_dict(json.loads(raw))
                if c.worker_id in alive:
                    used = float(lastused.get(field, 0.0))
                    out.append(c if used <= c.last_used else _with_last_used(c, used))
            return Snapshot(
                workers,
                [codec.device_from_dict(json.loads(d)) for d in devices.values()],
                out,
                _footprints(footprints.values()),
            )

        return await self._io("snapshot", read())

    # -- workers -----------------------------------------------------------------------
    async def gateway_heartbeat(self, gateway_id: str, ttl_s: float) -> int:
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.keys.gateways, {gateway_id: now + ttl_s})
        pipe.zremrangebyscore(self.keys.gateways, "-inf", now)
        pipe.zcard(self.keys.gateways)
        results = await self._io("gateway heartbeat", pipe.execute())
        return max(1, int(results[-1]))

    async def gateway_leave(self, gateway_id: str) -> None:
        await self._io("gateway leave", self.redis.zrem(self.keys.gateways, gateway_id))

    async def register_worker(self, worker: WorkerRecord) -> None:
        await self.heartbeat(worker)

    async def heartbeat(self, worker: WorkerRecord, ttl_s: float | None = None) -> bool:
        """Renew a worker's registration; True when it was not registered (new, expired,
        or Redis came back empty), which is when the caller re-announces its copies."""
        if "|" in worker.worker_id:
            raise ValueError(f"worker id {worker.worker_id!r} must not contain '|'")
        ttl_ms = int((ttl_s or self.heartbeat_ttl_s) * 1000)
        value = json.dumps(worker.__dict__, separators=(",", ":"))
        previous = await self._io(
            "heartbeat",
            self.redis.set(self.keys.worker(worker.worker_id), value, px=ttl_ms, get=True),
        )
        if previous is not None:
            return False
        await self._io("register", self.redis.sadd(self.keys.workers, worker.worker_id))
        await self._emit(WorkerUp(worker))
        return True

    async def remove_worker(self, worker_id: str) -> list[CopyView]:
        event = codec.event_to_json(WorkerDown(worker_id), self.origin)
        removed = await self._io(
            "remove worker",
            self._remove_worker(
                keys=[
                    self.keys.workers,
                    self.keys.worker(worker_id),
                    self.keys.copies,
                    self.keys.lastused,
                ],
                args=[worker_id, self.keys.events, event],
            ),
        )
        self._publish(WorkerDown(worker_id))
        return [codec.copy_from_dict(json.loads(r)) for r in removed]

    async def reap_expired(self) -> list[str]:
        ids = sorted(
            str(i) for i in await self._io("list workers", self.redis.smembers(self.keys.workers))
        )
        if not ids:
            return []
        records = await self._io(
            "read workers", self.redis.mget([self.keys.worker(i) for i in ids])
        )
        dead = [i for i, r in zip(ids, records, strict=True) if r is None]
        for worker_id in dead:
            log.warning("worker %s missed its heartbeats; dropping its copies", worker_id)
            await self.remove_worker(worker_id)
        return dead

    # -- devices and copies -----------------------------------------------------------------
    async def put_device(self, device: DeviceRecord) -> None:
        value = json.dumps(device.__dict__, separators=(",", ":"))
        await self._io("put device", self.redis.hset(self.keys.devices, device.device_id, value))
        await self._emit(DevicePut(device))

    async def reserve(
        self, copy: CopyView, device_id: str, capacity_bytes: int, fence: int | None = None
    ) -> bool:
        field = codec.copy_field(copy.key)
        value = json.dumps(codec.copy_to_dict(copy, device_id), separators=(",", ":"))
        event = codec.event_to_json(CopyUpserted(copy), self.origin, device_id)
        result = await self._io(
            "reserve",
            self._reserve(
                keys=[self.keys.copies, self.keys.lock(copy.model, copy.version)],
                args=[
                    field,
                    value,
                    device_id,
                    capacity_bytes,
                    copy.footprint_bytes,
                    fence or "",
                    self.keys.events,
                    event,
                ],
            ),
        )
        if result == -1:
            raise Unavailable(
                f"model '{copy.model}': this gateway's load lock expired before it reserved memory",
                retry_after_s=0.5,
            )
        if result == 1:
            self._publish(CopyUpserted(copy))
        return result == 1

    async def put_copy(self, copy: CopyView) -> None:
        device_id = self._device_of.get(copy.worker_id, "")
        value = json.dumps(codec.copy_to_dict(copy, device_id), separators=(",", ":"))
        await self._io(
            "put copy", self.redis.hset(self.keys.copies, codec.copy_field(copy.key), value)
        )
        await self._emit(CopyUpserted(copy), device_id)

    async def remove_copy(self, key: CopyKey) -> None:
        field = codec.copy_field(key)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.copies, field)
        pipe.hdel(self.keys.lastused, field)
        await self._io("remove copy", pipe.execute())
        await self._emit(CopyRemoved(key))

    async def touch(self, last_used: Mapping[CopyKey, float]) -> None:
        if last_used:
            mapping: dict[Any, Any] = {
                codec.copy_field(k): f"{t:.3f}" for k, t in last_used.items()
            }
            await self._io("touch", self.redis.hset(self.keys.lastused, mapping=mapping))

    async def record_footprint(self, footprint: Footprint) -> None:
        await self._io(
            "record footprint",
            self.redis.hset(
                self.keys.footprints,
                codec.footprint_field(footprint.key),
                codec.footprint_to_json(footprint),
            ),
        )
        await self._emit(FootprintPut(footprint))

    async def footprints(self) -> list[Footprint]:
        raw = await self._io("read footprints", self.redis.hvals(self.keys.footprints))
        return _footprints(str(r) for r in raw)

    # -- load lock --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def load_lock(self, model: str, version: int, timeout_s: float) -> AsyncIterator[int]:
        """Cluster-wide single flight for one model version.

        Timeline with two gateways A and B asking for the same cold model::

            A: INCR fence -> 7; SET lock 7 NX PX ttl -> OK      (A holds, token 7)
            B: INCR fence -> 8; SET lock 8 NX PX ttl -> nil     (B polls)
            A: reserve(..., fence=7) checks GET lock == 7, loads, publishes READY
            A: release: DEL lock only if it still holds 7
            B: SET ... -> OK, re-checks its view: READY copy, routes, no second load

        If A stalls past the ttl, B takes the lock with token 8 and A's reserve with
        token 7 is refused: a stale holder cannot commit memory.
        """
        key = self.keys.lock(model, version)
        ttl_ms = int(self.lock_ttl_s * 1000)
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            token = int(await self._io("lock", self.redis.incr(self.keys.fence)))
            if await self._io("lock", self.redis.set(key, token, nx=True, px=ttl_ms)):
                break
            if time.monotonic() + delay > deadline:
                raise Unavailable(
                    f"model '{model}' version {version}: another gateway has been loading it for "
                    f"over {timeout_s:.0f}s",
                    retry_after_s=1.0,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        renew = asyncio.create_task(self._keep_lock(key, str(token), ttl_ms))
        try:
            yield token
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew
            with contextlib.suppress(ResidencyStoreError):
                await self._io("unlock", self._release(keys=[key], args=[token]))

    async def _keep_lock(self, key: str, token: str, ttl_ms: int) -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            with contextlib.suppress(ResidencyStoreError):
                await self._io("renew lock", self._renew(keys=[key], args=[token, ttl_ms]))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.redis.aclose()
        await self._sub_redis.aclose()


def _footprints(values: Iterable[str]) -> list[Footprint]:
    """Decoded measurements; one malformed entry (a later schema's) is skipped."""
    out = []
    for raw in values:
        try:
            out.append(codec.footprint_from_dict(json.loads(raw)))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("residency store: ignoring malformed footprint %r: %s", raw[:200], e)
    return out


def _with_last_used(copy: CopyView, t: float) -> CopyView:
    return dataclasses.replace(copy, last_used=t)
