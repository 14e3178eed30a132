"""Dynamic micro-batching: concurrent requests of the same kind and shape run on the model as one batch.

Requests wait in arrival order. The worker takes the oldest one, gives others of the same key (operation and
per-item shape) a short window to arrive, then runs up to ``max_batch`` items together in one worker thread
and hands each request its slice of the result. While a batch runs, new requests queue up, so under load
batches fill without waiting at all. The window opens only while requests are arriving together (the last
batch carried more than one): then it is ``max_wait_s``, or a tenth of the recent batch run time when that is
longer, so on a slow device the clients that were just answered get time to send their next request, while the
wait adds at most about 10% to a request's time on the model. A client working alone never waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable

import torch

from klvae.serve.errors import Unavailable

log = logging.getLogger("klvae.serve")

RunBatch = Callable[[Hashable, torch.Tensor], torch.Tensor]
# The batching window grows to this fraction of the recent batch run time (see the module docstring).
WAIT_FRACTION = 0.1


@dataclasses.dataclass
class _Job:
    key: Hashable
    x: torch.Tensor
    future: asyncio.Future

    @property
    def items(self) -> int:
        return self.x.shape[0]


@dataclasses.dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    requests: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        d = dataclasses.asdict(self)
        d["mean_batch"] = round(self.items / self.batches, 3) if self.batches else 0.0
        d["busy_s"] = round(self.busy_s, 3)
        return d


class MicroBatcher:
    """Collects ``submit(key, x)`` calls into batches for ``run(key, batch)`` (concatenated on dim 0).

    ``run`` is blocking and runs in one dedicated thread; it must return a tensor whose dim 0 matches the
    batch. ``max_queue`` bounds the items waiting; beyond it ``submit`` raises :class:`Unavailable` (503).
    """

    def __init__(self, run: RunBatch, *, max_batch: int = 8, max_wait_s: float = 0.005, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self._run = run
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._recent_batch_s = 0.0  # moving average of one batch's run time
        self._last_batch_requests = 0
        self._pending: list[_Job] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def queued_items(self) -> int:
        return sum(job.items for job in self._pending)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._closing = False
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="klvae-model")
        self._task = asyncio.create_task(self._loop(), name="klvae-batcher")

    async def stop(self) -> None:
        """Finish the batch in progress, refuse what is still queued (503), and stop the worker thread."""
        self._closing = True
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(Unavailable("the server is shutting down", reason="shutting_down"))
        self._pending.clear()
        if self._task is not None:
            self._arrived.set()
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Queue ``x`` (its items on dim 0) and wait for its slice of the batch result."""
        if self._task is None or self._closing:
            raise Unavailable("the server is shutting down" if self._closing else "the model is not running",
                              reason="shutting_down" if self._closing else "not_running")
        if self.queued_items + x.shape[0] > self.max_queue and self._pending:
            raise Unavailable(f"the queue is full ({self.queued_items} items waiting); retry shortly",
                              reason="queue_full")
        job = _Job(key, x, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._arrived.set()
        return await job.future

    async def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn()`` on the model thread, between batches (the warm-up uses it; no batch statistics)."""
        if self._executor is None:
            raise Unavailable("the model is not running", reason="not_running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ------------------------------------------------------------------------------------------ worker
    async def _loop(self) -> None:
        while True:
            self._pending = [job for job in self._pending if not job.future.done()]  # drop cancelled
            if not self._pending:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            key = self._pending[0].key
            await self._gather(key)
            batch = self._take(key)
            if batch:
                await self._execute(key, batch)

    @property
    def wait_s(self) -> float:
        """How long the oldest request waits for others to join its batch."""
        if self._last_batch_requests <= 1 or self.max_wait_s == 0:
            return 0.0
        return max(self.max_wait_s, WAIT_FRACTION * self._recent_batch_s)

    async def _gather(self, key: Hashable) -> None:
        """Wait up to :attr:`wait_s` for more items of ``key``, unless a full batch is already there."""
        window = self.wait_s
        if window == 0:
            return
        deadline = time.monotonic() + window
        while not self._closing and self._count(key) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _count(self, key: Hashable) -> int:
        return sum(job.items for job in self._pending if job.key == key and not job.future.done())

    def _take(self, key: Hashable) -> list[_Job]:
        """Remove and return the oldest live jobs of ``key`` totalling at most ``max_batch`` items (at least one)."""
        batch, rest, items = [], [], 0
        for job in self._pending:
            if job.future.done():
                continue
            if job.key == key and (not batch or items + job.items <= self.max_batch):
                batch.append(job)
                items += job.items
            else:
                rest.append(job)
        self._pending = rest
        return batch

    async def _execute(self, key: Hashable, batch: list[_Job]) -> None:
        start, items = time.perf_counter(), sum(job.items for job in batch)
        try:
            x = batch[0].x if len(batch) == 1 else torch.cat([job.x for job in batch])
            y = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, key, x)
            if y.shape[0] != x.shape[0]:
                raise RuntimeError(f"the model returned {y.shape[0]} items for a batch of {x.shape[0]}")
        except Exception as e:  # a model failure fails this batch's requests, not the server
            log.exception("batch of %d items (key %s) failed", items, key)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self._record(len(batch), items, time.perf_counter() - start)
        for job, part in zip(batch, y.split([job.items for job in batch])):
            if not job.future.done():  # the client may have gone away
                job.future.set_result(part)

    def _record(self, requests: int, items: int, seconds: float) -> None:
        s = self.stats
        s.batches += 1
        s.items += items
        s.requests += requests
        s.largest_batch = max(s.largest_batch, items)
        s.busy_s += seconds
        self._last_batch_requests = requests
        self._recent_batch_s = seconds if s.batches == 1 else 0.8 * self._recent_batch_s + 0.2 * seconds
