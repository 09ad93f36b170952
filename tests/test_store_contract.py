"""One contract, two stores: the in-memory store and RedisStore on a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from modelpool.cache.footprints import FootprintBook
from modelpool.cache.records import (
    CopyRemoved,
    CopyState,
    CopyUpserted,
    CopyView,
    DeviceRecord,
    Footprint,
    FootprintPut,
    Resynced,
    StoreEvent,
    WorkerDown,
    WorkerRecord,
    WorkerUp,
    device_kind,
)
from modelpool.cache.store import InMemoryStore, ResidencyStore
from modelpool.cache.view import ResidencyView
from modelpool.placement.errors import ResidencyStoreError, Unavailable

W1 = WorkerRecord("w1", "127.0.0.1:1", "n/cpu", "n", 1)
W2 = WorkerRecord("w2", "127.0.0.1:2", "n/cpu", "n", 2)


def copy(
    model: str, worker: str = "w1", state: CopyState = CopyState.READY, size: int = 100
) -> CopyView:
    return CopyView(model, 1, worker, state, size, last_used=1.0, loaded_at=1.0)


@pytest.fixture(params=["memory", "redis"])
async def make_store(request, tmp_path: Path) -> AsyncIterator[Callable[[], ResidencyStore]]:
    """A factory: every store it makes shares one backend (one dict, or one Redis)."""
    made: list[ResidencyStore] = []
    if request.param == "memory":
        shared = InMemoryStore()

        def make() -> ResidencyStore:
            return shared

        yield make
        return
    from modelpool.cache.redis_store import RedisStore
    from tests.redis_server import RedisServer, need_redis

    need_redis()
    server = RedisServer(tmp_path).start()

    def make_redis() -> ResidencyStore:
        s = RedisStore(server.url, heartbeat_ttl_s=1.0)
        made.append(s)
        return s

    yield make_redis
    for s in made:
        await s.close()
    server.stop()


async def test_workers_copies_devices_round_trip(make_store) -> None:
    store = make_store()
    await store.register_worker(W1)
    await store.register_worker(W2)
    await store.put_device(DeviceRecord("n/cpu", 1000, source="budget"))
    await store.put_copy(copy("a"))
    await store.put_copy(copy("b", "w2"))
    snap = await store.snapshot()
    assert {w.worker_id for w in snap.workers} == {"w1", "w2"}
    assert {(c.model, c.worker_id) for c in snap.copies} == {("a", "w1"), ("b", "w2")}
    assert snap.devices == [DeviceRecord("n/cpu", 1000, source="budget")]
    dropped = await store.remove_worker("w1")
    assert [c.model for c in dropped] == ["a"]
    snap = await store.snapshot()
    assert [c.model for c in snap.copies] == ["b"]
    await store.remove_copy(copy("b", "w2").key)
    assert (await store.snapshot()).copies == []


async def test_reservations_never_overcommit_a_device(make_store) -> None:
    stores = [make_store() for _ in range(3)]
    await stores[0].register_worker(W1)
    await stores[0].register_worker(W2)
    # 30 concurrent reservations of 100 bytes from three clients against 1000 bytes.
    results = await asyncio.gather(
        *(
            s.reserve(copy(f"m{i}", "w1" if i % 2 else "w2", CopyState.LOADING), "n/cpu", 1000)
            for i, s in enumerate(stores * 10)
        )
    )
    assert sum(results) == 10
    snap = await stores[0].snapshot()
    assert sum(c.footprint_bytes for c in snap.copies) == 1000


async def test_load_lock_is_exclusive_and_tokens_grow(make_store) -> None:
    a, b = make_store(), make_store()
    inside = 0
    most = 0
    tokens: list[int] = []

    async def hold(store: ResidencyStore) -> None:
        nonlocal inside, most
        async with store.load_lock("m", 1, timeout_s=10) as token:
            tokens.append(token)
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(hold(s) for s in (a, b) * 4))
    assert most == 1
    assert tokens == sorted(tokens) and len(set(tokens)) == 8


async def test_load_lock_times_out_with_unavailable(make_store) -> None:
    a, b = make_store(), make_store()
    async with a.load_lock("m", 1, timeout_s=5):
        with pytest.raises(Unavailable):
            async with b.load_lock("m", 1, timeout_s=0.2):
                pass


async def test_changes_reach_another_process_view(make_store) -> None:
    writer, reader = make_store(), make_store()
    view = ResidencyView()
    seen: list[StoreEvent] = []
    changed = asyncio.Event()
    reader.subscribe(view.apply)
    reader.subscribe(seen.append)
    reader.subscribe(lambda _e: changed.set())

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                changed.clear()
                await changed.wait()

    await reader.start()
    if hasattr(reader, "connected"):
        await asyncio.wait_for(reader.connected.wait(), 10)
    await writer.register_worker(W1)
    await writer.put_copy(copy("a"))
    await writer.remove_copy(copy("a").key)
    await writer.put_copy(copy("b"))
    await until(lambda: bool(view.ready_copies("b", 1)))
    assert [c.model for c in view.ready_copies("b", 1)] == ["b"]
    assert not view.ready_copies("a", 1)
    kinds = [type(e) for e in seen if not isinstance(e, Resynced)]
    assert kinds[:4] == [WorkerUp, CopyUpserted, CopyRemoved, CopyUpserted]
    await writer.remove_worker("w1")
    await until(lambda: not view.workers)
    assert not view.workers and isinstance(seen[-1], WorkerDown)


async def test_touch_updates_last_use(make_store) -> None:
    store = make_store()
    await store.register_worker(W1)
    await store.put_copy(copy("a"))
    await store.touch({copy("a").key: 1234.5})
    [c] = (await store.snapshot()).copies
    assert c.last_used == pytest.approx(1234.5)


def footprint(model: str, kind: str = "cpu", peak: int = 300, at: float = 1.0) -> Footprint:
    return Footprint(model, 1, kind, peak - 100, peak, 0.25, measured_at=at)


async def test_footprints_are_kept_per_model_version_and_device_kind(make_store) -> None:
    store = make_store()
    await store.record_footprint(footprint("a", "cpu", 300))
    await store.record_footprint(footprint("a", "cuda", 500))
    await store.record_footprint(footprint("a", "cpu", 400, at=2.0))  # a later load
    got = sorted(await store.footprints(), key=lambda f: f.device_kind)
    assert got == [footprint("a", "cpu", 400, at=2.0), footprint("a", "cuda", 500)]
    snap = await store.snapshot()
    assert sorted(snap.footprints, key=lambda f: f.device_kind) == got


async def test_footprints_reach_another_process_and_outlive_it(make_store) -> None:
    writer, reader = make_store(), make_store()
    view = ResidencyView()
    book = FootprintBook(reader, view)
    seen = asyncio.Event()
    reader.subscribe(lambda e: seen.set() if isinstance(e, FootprintPut) else None)
    await reader.start()
    if hasattr(reader, "connected"):
        await asyncio.wait_for(reader.connected.wait(), 10)
    await writer.record_footprint(footprint("a", "cpu", 300))
    await asyncio.wait_for(seen.wait(), 10)
    assert book.get(("a", 1)) == (300, 0.25)
    await writer.close()
    # A process started afterwards (a restarted gateway) reads it from the store.
    later = make_store()
    fresh = FootprintBook(later, ResidencyView())
    fresh.load((await later.snapshot()).footprints)
    assert fresh.get(("a", 1)) == (300, 0.25)


def test_book_prices_a_model_by_the_device_kinds_the_pool_has() -> None:
    view = ResidencyView()
    book = FootprintBook(InMemoryStore(), view)
    assert book.get(("a", 1)) is None
    book.put(footprint("a", "cpu", 300))
    book.put(footprint("a", "cuda", 900))
    # No worker yet: the largest measurement of any kind.
    assert book.get(("a", 1)) == (900, 0.25)
    view.apply(WorkerUp(W1))  # a CPU worker: the CPU measurement prices it
    assert book.get(("a", 1)) == (300, 0.25)
    book.guess("a", 1, 450, 60.0)  # an out-of-memory load asks for more, locally
    assert book.get(("a", 1)) == (450, 60.0)
    book.put(footprint("a", "cpu", 350, at=5.0))  # the next measurement replaces it
    assert book.get(("a", 1)) == (350, 0.25)
    book.load([footprint("a", "cpu", 999, at=0.5)])  # an older snapshot loses
    assert book.get(("a", 1)) == (350, 0.25)


def test_device_kind_of_device_ids() -> None:
    assert device_kind("node/cpu") == "cpu"
    assert device_kind("node/cuda:1") == "cuda"
    assert device_kind("cuda:0") == "cuda"


# -- Redis only ------------------------------------------------------------------------


async def test_heartbeat_expiry_and_reannounce(redis_server) -> None:
    from modelpool.cache.redis_store import RedisStore

    store = RedisStore(redis_server.url, heartbeat_ttl_s=0.3)
    try:
        assert await store.heartbeat(W1) is True  # new: the caller announces its copies
        assert await store.heartbeat(W1) is False
        await store.put_copy(copy("a"))
        await asyncio.sleep(0.5)
        assert (await store.snapshot()).workers == []  # expired: not alive
        assert await store.reap_expired() == ["w1"]
        assert (await store.snapshot()).copies == []
        assert await store.heartbeat(W1) is True
    finally:
        await store.close()


async def test_stale_lock_holder_cannot_reserve(redis_server) -> None:
    from modelpool.cache.redis_store import RedisStore

    a = RedisStore(redis_server.url, lock_ttl_s=0.3)
    b = RedisStore(redis_server.url)
    try:
        await a.register_worker(W1)
        async with a.load_lock("m", 1, timeout_s=5) as token:
            a_renew = redis_server.client()
            a_renew.delete("modelpool:v1:lock:m:1")  # the lock lapses (a stalled holder)
            async with b.load_lock("m", 1, timeout_s=5) as newer:
                assert newer > token
                with pytest.raises(Unavailable, match="lock expired"):
                    await a.reserve(copy("m", state=CopyState.LOADING), "n/cpu", 1000, fence=token)
                assert await b.reserve(
                    copy("m", state=CopyState.LOADING), "n/cpu", 1000, fence=newer
                )
    finally:
        await a.close()
        await b.close()


async def test_outage_raises_store_error_then_recovers(redis_server) -> None:
    from modelpool.cache.redis_store import RedisStore

    store = RedisStore(redis_server.url, op_timeout_s=0.5)
    try:
        await store.register_worker(W1)
        redis_server.stop()
        with pytest.raises(ResidencyStoreError) as err:
            await store.put_copy(copy("a"))
        assert err.value.retry_after_s > 0 and "redis" in err.value.message
        redis_server.start()
        await store.register_worker(W1)
        await store.put_copy(copy("a"))
        assert [c.model for c in (await store.snapshot()).copies] == ["a"]
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["password_db", "tls"])
async def test_redis_urls_with_password_db_and_tls(tmp_path: Path, kind: str) -> None:
    import shutil

    from modelpool.cache.redis_store import RedisStore
    from tests.redis_server import RedisServer, need_redis

    need_redis()
    if kind == "tls" and shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    server = RedisServer(tmp_path, password="s3cret", db=3, tls=kind == "tls").start()
    store = RedisStore(server.url)
    try:
        await store.register_worker(W1)
        assert [w.worker_id for w in (await store.snapshot()).workers] == ["w1"]
        assert server.client().exists("modelpool:v1:worker:w1") == 1  # in db 3
        wrong = RedisStore(server.url.replace("s3cret", "wrong"))
        with pytest.raises(ResidencyStoreError):
            await wrong.snapshot()
        await wrong.close()
    finally:
        await store.close()
        server.stop()


async def test_gateways_are_counted_while_they_heartbeat(make_store, request) -> None:
    a, b = make_store(), make_store()
    assert await a.gateway_heartbeat("g1", ttl_s=0.3) == 1
    second = await b.gateway_heartbeat("g2", ttl_s=30)
    if isinstance(a, InMemoryStore):
        assert second == 1  # one process, one gateway
        return
    assert second == 2
    await asyncio.sleep(0.4)  # g1 stopped heartbeating: past its expiry
    assert await b.gateway_heartbeat("g2", ttl_s=30) == 1
