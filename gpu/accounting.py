"""What a model copy holds on its device, measured so that other work in the same worker
cannot be mistaken for it.

A worker loads on one thread while others load, unload and run forwards, and the CUDA
allocator's counters (``memory_allocated``, ``memory_reserved``) are device-wide. A
difference of such a counter taken around one operation therefore also counts whatever
the other threads allocated or freed meanwhile. So nothing here subtracts two readings
taken at different times to attribute memory to one copy:

- a copy's footprint is the bytes of its own parameter and buffer storages
  (:func:`module_bytes`), exact whatever else runs;
- its peak is the allocator's high-water mark over its load and warm-up; loads run one
  at a time per worker (``ModelRuntime`` holds a lock), so only forwards and unloads
  share the window (:class:`PeakMeter` says which way they bias it);
- what an unload leaves behind is what the allocator still holds that no live tensor
  uses and ``empty_cache()`` could not give back (:func:`retained_after_release`),
  read from one snapshot of the allocator.

The allocator is an interface so the same accounting runs on CUDA, on CPU (where
nothing is cached) and against fakes in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

#: Test hook, read once when a CPU worker starts: see :class:`FakeRetainedAllocator`.
FAKE_RETAINED_ENV = "MODELPOOL_FAKE_RETAINED_BYTES"


@dataclass(frozen=True)
class AllocatorUsage:
    """One consistent reading of a device allocator, in bytes.

    ``allocated_bytes``: in live tensors. ``reserved_bytes``: taken from the device,
    live tensors plus the cache. ``unreleasable_bytes``: the part of the cache that
    ``empty_cache()`` cannot give back, free blocks inside segments that still hold a
    live tensor (PyTorch's ``inactive_split_bytes``). Right after ``empty_cache()``
    with nothing else running it equals ``reserved_bytes - allocated_bytes``.
    """

    allocated_bytes: int
    reserved_bytes: int
    unreleasable_bytes: int = 0

    @property
    def cached_bytes(self) -> int:
        """Held from the device but used by no live tensor."""
        return max(0, self.reserved_bytes - self.allocated_bytes)


class Allocator(Protocol):
    """What the accounting needs from a device's memory allocator."""

    def usage(self) -> AllocatorUsage:
        """All figures read together (never torn by another thread's allocation)."""
        ...

    def synchronize(self) -> None:
        """Wait for the device's queued work, so the counters include it."""
        ...

    def empty_cache(self) -> None:
        """Give cached blocks that hold no live tensor back to the device."""
        ...

    def reset_peak(self) -> None:
        """Start a new high-water mark at the current allocated bytes."""
        ...

    def peak_bytes(self) -> int:
        """The most allocated bytes since :meth:`reset_peak`."""
        ...


class CudaAllocator:
    """The torch CUDA caching allocator of one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def usage(self) -> AllocatorUsage:
        # One memory_stats() call is one snapshot taken under the allocator's lock;
        # memory_allocated() then memory_reserved() could straddle another thread's
        # allocation and show it in one term only.
        stats = torch.cuda.memory_stats(self.device)
        return AllocatorUsage(
            allocated_bytes=int(stats.get("allocated_bytes.all.current", 0)),
            reserved_bytes=int(stats.get("reserved_bytes.all.current", 0)),
            unreleasable_bytes=int(stats.get("inactive_split_bytes.all.current", 0)),
        )

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        # No synchronize() first: the allocator waits for the events of blocks still in
        # use by queued work itself, and every moment between an unload dropping its
        # copy and this call is one in which another thread's allocation can split a
        # freed block, leaving a remainder that can no longer be given back.
        torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


class CpuAllocator:
    """CPU tensors: no device cache, so nothing to count. Footprints come from
    :func:`module_bytes`, which needs no allocator."""

    def usage(self) -> AllocatorUsage:
        return AllocatorUsage(0, 0)

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def reset_peak(self) -> None:
        pass

    def peak_bytes(self) -> int:
        return 0


class FakeRetainedAllocator(CpuAllocator):
    """TEST HOOK, never for production: a CPU allocator whose cache ``empty_cache()``
    can never shrink below ``retained_bytes``, so every unload reports that many bytes
    retained. With ``MODELPOOL_FAKE_RETAINED_BYTES=N`` in a CPU worker's environment,
    an end-to-end test drives the gateway's recycle-on-retained path without a GPU.
    """

    def __init__(self, retained_bytes: int) -> None:
        self.retained_bytes = retained_bytes

    def usage(self) -> AllocatorUsage:
        n = self.retained_bytes
        return AllocatorUsage(allocated_bytes=0, reserved_bytes=n, unreleasable_bytes=n)


def allocator_for(device: torch.device, env: Mapping[str, str]) -> Allocator:
    """The allocator of ``device``; ``env`` is read for the CPU test hook only
    (``MODELPOOL_FAKE_RETAINED_BYTES``, ignored with a warning on CUDA, where the
    allocator's own figures are the truth)."""
    fake = env.get(FAKE_RETAINED_ENV)
    if device.type == "cuda":
        if fake:
            log.warning("%s is a CPU test hook; ignored on device=%s", FAKE_RETAINED_ENV, device)
        return CudaAllocator(device)
    if fake:
        try:
            n = int(fake)
        except ValueError:
            raise ValueError(
                f"{FAKE_RETAINED_ENV}={fake!r}: expected a whole number of bytes, e.g. "
                f"{FAKE_RETAINED_ENV}={512 << 20}"
            ) from None
        if n < 0:
            raise ValueError(f"{FAKE_RETAINED_ENV}={fake!r}: expected a number of bytes >= 0")
        log.warning(
            "test hook %s=%d: every unload reports %d bytes retained", FAKE_RETAINED_ENV, n, n
        )
        return FakeRetainedAllocator(n)
    return CpuAllocator()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, shared storages counted once.

    This is a copy's footprint: it reads the module's own tensors, not a device-wide
    counter, so concurrent loads and forwards in the worker cannot change it.
    """
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class PeakMeter:
    """The allocator's high-water mark over one load and its warm-up, above what was
    allocated when the load began: what admitting this model again must find free.

    Loads in a worker run one at a time, so no other load shares the window. A forward
    that allocates during it can only raise the mark: the peak comes out larger than
    the load alone needed, which admission tolerates (it reserves a little more). A
    forward or an unload that *frees* memory allocated before the window opened can
    hide part of the load's own rise, so the result is never below the footprint,
    which is exact.
    """

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator
        allocator.synchronize()
        allocator.reset_peak()
        self.start_bytes = allocator.usage().allocated_bytes

    def peak(self, footprint_bytes: int) -> int:
        """The window's rise, after waiting for the device's queued work."""
        self.allocator.synchronize()
        return max(self.allocator.peak_bytes() - self.start_bytes, footprint_bytes)


def retained_after_release(
    allocator: Allocator,
    *,
    attempts: int = 3,
    settle_s: float = 0.05,
    negligible_bytes: int = 16 << 20,
) -> int:
    """Bytes the allocator still holds after ``empty_cache()`` that no live tensor uses:
    memory only a new process gets back. Call it once the unloaded copy's last
    reference is gone; the figure is worker-wide, not the copy's share.

    Why concurrent work cannot appear here, as a timeline in one worker::

        unload(A) thread                      load(B) / forward thread
        drop A (400 MB freed to the cache)
        empty_cache(): A's blocks go back     allocates 300 MB
        reads the allocator                   (B's 300 MB is allocated *and* reserved)

    The old figure, ``footprint - (allocated before - allocated after)``, read 400 MB
    freed and 300 MB allocated as "100 MB returned, 300 MB retained" and recycled a
    healthy worker. Here another thread's live tensors add as much to reserved as to
    allocated and cancel out; and what a forward frees after ``empty_cache()`` ran is
    a whole free segment, releasable, so it is not in ``unreleasable_bytes`` either
    (it would be in ``reserved - allocated`` for that instant).

    What remains is fragmentation: free space in segments that hold a live tensor.
    Some of it is transient, an activation of a forward in flight split from a cached
    block; so a reading above ``negligible_bytes`` is taken again after ``settle_s``
    (up to ``attempts`` readings) and the smallest is kept. Memory really stuck stays
    through every reading.
    """

    def read() -> int:
        allocator.empty_cache()
        return allocator.usage().unreleasable_bytes

    best = read()
    for _ in range(attempts - 1):
        if best <= negligible_bytes:
            break
        time.sleep(settle_s)
        best = min(best, read())
    return best
