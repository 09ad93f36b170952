"""Triton's dynamic batching for one model copy.

Concurrent requests whose inputs agree on everything but the batch dimension are
concatenated and run as one forward, then the outputs are split back by rows. A model
opts in as in Triton, with ``dynamic_batching { max_queue_delay_microseconds: N }`` in
its config.pbtxt (and ``max_batch_size > 0``). With the default delay of 0 the
batcher never waits: it takes whatever queued up while the previous batch ran, so a
quiet model pays nothing and a busy one gets batches for free.

If a batched forward raises, each request is run again on its own, so one bad input
fails alone and never takes the other tenants' requests with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from modelpool.gpu.execution import Execution

log = logging.getLogger(__name__)

Forward = Callable[[list[torch.Tensor]], list[torch.Tensor]]
#: Runs a blocking forward off the event loop (the worker's inference pool).
Runner = Callable[[Forward, list[torch.Tensor]], Awaitable[list[torch.Tensor]]]
Key = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class _Pending:
    args: list[torch.Tensor]
    rows: int
    arrived: float
    future: asyncio.Future[tuple[list[torch.Tensor], Execution]] = field(repr=False)


class Batcher:
    """Args:
    forward: the model's forward on CPU tensors, returning CPU tensors (blocking).
    run: how a forward is run off the loop.
    max_batch: rows per forward at most (the model's max_batch_size).
    max_delay_s: how long the oldest request may wait for others to join it.
    """

    def __init__(
        self, name: str, forward: Forward, run: Runner, max_batch: int, max_delay_s: float
    ) -> None:
        self.name = name
        self.forward = forward
        self.run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._queues: dict[Key, collections.deque[_Pending]] = collections.defaultdict(
            collections.deque
        )
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{name}")

    async def submit(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs, _ = await self.submit_timed(args)
        return outputs

    async def submit_timed(self, args: list[torch.Tensor]) -> tuple[list[torch.Tensor], Execution]:
        """The request's outputs and the forward it ran in (shared with the others of
        its batch; exactly one of them is the execution's lead)."""
        key: Key = tuple((tuple(a.shape[1:]), a.dtype) for a in args)
        future: asyncio.Future[tuple[list[torch.Tensor], Execution]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queues[key].append(_Pending(args, int(args[0].shape[0]), time.monotonic(), future))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for queue in self._queues.values():
            for p in queue:
                if not p.future.done():
                    p.future.cancel()

    async def _loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while True:
                waiting = [(q[0].arrived, k) for k, q in self._queues.items() if q]
                if not waiting:
                    break
                _, key = min(waiting)
                await self._fill(key)
                await self._execute(self._take(key))

    async def _fill(self, key: Key) -> None:
        """Wait, up to the oldest request's delay, for the batch to fill."""
        queue = self._queues[key]
        deadline = queue[0].arrived + self.max_delay_s
        while sum(p.rows for p in queue) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def _take(self, key: Key) -> list[_Pending]:
        queue = self._queues[key]
        batch = [queue.popleft()]
        rows = batch[0].rows
        while queue and rows + queue[0].rows <= self.max_batch:
            rows += queue[0].rows
            batch.append(queue.popleft())
        return [p for p in batch if not p.future.cancelled()]

    async def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        if len(batch) == 1:
            await self._one(batch[0])
            return
        args = [torch.cat(parts) for parts in zip(*(p.args for p in batch), strict=True)]
        sizes = [p.rows for p in batch]
        try:
            started = time.monotonic()
            outputs = await self.run(self.forward, args)
            infer_s = time.monotonic() - started
            if any(out.dim() == 0 or out.shape[0] != sum(sizes) for out in outputs):
                raise ValueError("an output has no batch dimension to split")
            split = [torch.split(out, sizes) for out in outputs]
        except Exception as e:  # the model raised on the batch: find out whose input it was
            log.info(
                "batch of %d for model=%s failed (%s); running each alone", len(batch), self.name, e
            )
            for p in batch:
                await self._one(p)
            return
        lead = True  # the first request still waiting counts the forward
        for i, p in enumerate(batch):
            if not p.future.done():
                execution = Execution(sum(sizes), lead, started - p.arrived, infer_s)
                p.future.set_result(([parts[i] for parts in split], execution))
                lead = False

    async def _one(self, p: _Pending) -> None:
        started = time.monotonic()
        try:
            result = await self.run(self.forward, p.args)
        except Exception as e:  # handed to this request's caller, which maps it
            if not p.future.done():
                p.future.set_exception(e)
            return
        if not p.future.done():
            infer_s = time.monotonic() - started
            p.future.set_result((result, Execution(p.rows, True, started - p.arrived, infer_s)))
