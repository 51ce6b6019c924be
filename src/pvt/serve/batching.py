"""Dynamic batching with a bounded queue: requests that arrive close together share one forward pass.

The first request of a batch waits at most ``wait_s`` for company; requests that queued while
the previous batch was running join the next one at once, so a busy server batches without
waiting at all. Inference runs on one worker thread, off the event loop, which keeps accepting
and decoding requests meanwhile.

The queue holds at most ``max_queue`` requests: one that finds it full is refused at once
(:class:`QueueFull`, the server's 503) instead of waiting behind work it would time out on. A
request whose caller stopped waiting (timed out, disconnected) is dropped before its forward.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFull(Exception):
    """The queue already holds ``max_queue`` requests; ``retry_after_s`` estimates when it has room."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"the queue is full ({depth} requests waiting)")
        self.depth, self.retry_after_s = depth, retry_after_s


class Draining(Exception):
    """The server is shutting down and its grace period ran out before this request's turn."""


class Batcher(Generic[In, Out]):
    """``await submit(item)`` -> ``(run's output for item, size of the batch it ran in)``."""

    def __init__(
        self,
        run: Callable[[list[In]], list[Out]],
        *,
        max_batch: int,
        wait_s: float,
        max_queue: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """``on_batch(size, seconds)`` hears of every batch computed (for /metrics)."""
        if max_batch < 1 or wait_s < 0 or (max_queue is not None and max_queue < 1):
            raise ValueError(
                f"max_batch={max_batch} and max_queue={max_queue} must be >= 1 and the batch wait ({wait_s} s) >= 0"
            )
        self.run, self.max_batch, self.wait_s, self.max_queue = run, max_batch, wait_s, max_queue
        self.on_batch = on_batch
        self.batches = 0
        self.dropped = 0  # requests whose caller had gone before their forward
        self.mean_batch_s = 0.0  # an exponential average of a forward's time, for Retry-After
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[tuple[Out, int]]]] = asyncio.Queue()
        # One thread: batches run one after another, never competing for the CPU cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pvt-infer")
        self._worker: asyncio.Task[None] | None = None
        self._unanswered = 0
        self._forming: list[tuple[In, asyncio.Future[tuple[Out, int]]]] = []  # off the queue, gathering company
        self._closed: Exception | None = None  # set by close(): new requests fail with it
        self._hurry: asyncio.Event | None = None  # set by hurry(): batches stop waiting for company

    @property
    def depth(self) -> int:
        """Requests whose forward has not started: queued, or in a batch still gathering company
        (not counting the batch being computed)."""
        return self._queue.qsize() + len(self._forming)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet answered: waiting, gathering company, or running."""
        return self._unanswered

    def start(self) -> None:
        self._hurry = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self.fail_waiting(Draining("the server stopped"))
        # Not waiting for a forward still running: the thread finishes it and exits.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: In) -> tuple[Out, int]:
        """Queue ``item`` and wait for its output; :class:`QueueFull` at once if there is no room.
        Cancelling the wait (a timeout, a client gone) drops the item if its batch has not started."""
        if self._closed is not None:
            raise self._closed
        self.check_room()
        future: asyncio.Future[tuple[Out, int]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        self._unanswered += 1
        try:
            return await future
        finally:
            self._unanswered -= 1

    def check_room(self) -> None:
        """:class:`QueueFull` if the queue already holds ``max_queue`` requests."""
        if self.max_queue is not None and self.depth >= self.max_queue:
            raise QueueFull(self.depth, self.retry_after_s())

    def retry_after_s(self) -> float:
        """About how long until the queue has room: the batches ahead times a batch's time."""
        batches_ahead = self.depth // self.max_batch + 1
        return batches_ahead * max(self.mean_batch_s, self.wait_s)

    def hurry(self) -> None:
        """From now on a batch starts as soon as the worker is free: no more company is coming
        (the server is draining), so waiting for it would only delay the answers."""
        self.wait_s = 0.0
        if self._hurry is not None:
            self._hurry.set()

    def close(self, error: Exception) -> int:
        """Take no more requests (they fail with ``error``), and fail those still waiting for their
        batch with it; how many there were. The batch being computed still completes."""
        self._closed = error
        return self.fail_waiting(error)

    def fail_waiting(self, error: Exception) -> int:
        """Answer every request still waiting for its batch with ``error``; how many there were."""
        failed = 0
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(error)
                failed += 1
        return failed

    async def _collect(self) -> list[tuple[In, asyncio.Future[tuple[Out, int]]]]:
        loop = asyncio.get_running_loop()
        batch = self._forming = [await self._queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if loop.time() >= deadline:
                break
            # Not wait_for: before Python 3.12 it can drop an item that arrives as the time runs out.
            getter = loop.create_task(self._queue.get())
            assert self._hurry is not None  # made by start(), which runs this loop
            hurried = loop.create_task(self._hurry.wait())
            await asyncio.wait({getter, hurried}, timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            hurried.cancel()
            if not getter.done():
                getter.cancel()  # a cancelled get leaves its item in the queue
                await asyncio.gather(getter, return_exceptions=True)
            if getter.cancelled():
                break
            batch.append(getter.result())
        return batch

    async def _loop(self) -> None:
        while True:
            collected = await self._collect()
            self._forming = []
            # Callers that stopped waiting (cancelled futures) cost no forward.
            batch = [(item, future) for item, future in collected if not future.done()]
            self.dropped += len(collected) - len(batch)
            if not batch:
                continue
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[In, asyncio.Future[tuple[Out, int]]]]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for item, _ in batch]
        start = time.perf_counter()
        try:
            outs = await loop.run_in_executor(self._executor, self._run_checked, items)
        except Exception:
            # One bad input must not fail its batch-mates: run them one by one to find it.
            for item, future in batch:
                try:
                    alone = await loop.run_in_executor(self._executor, self._run_checked, [item])
                    _settle(future, (alone[0], 1))
                except Exception as e:
                    _fail(future, e)
            return
        self._record(len(batch), time.perf_counter() - start)
        for (_, future), out in zip(batch, outs, strict=True):
            _settle(future, (out, len(batch)))

    def _record(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.mean_batch_s = seconds if self.batches == 1 else 0.8 * self.mean_batch_s + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(size, seconds)

    def _run_checked(self, items: list[In]) -> list[Out]:
        outs = self.run(items)
        if len(outs) != len(items):
            raise RuntimeError(f"the model answered {len(outs)} outputs for {len(items)} inputs")
        return outs


def _settle(future: asyncio.Future[tuple[Out, int]], value: tuple[Out, int]) -> None:
    if not future.done():  # the client may have gone away (its request was cancelled)
        future.set_result(value)


def _fail(future: asyncio.Future[tuple[Out, int]], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
