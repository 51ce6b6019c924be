"""Dynamic batching: requests that arrive close together share one forward pass.

The first request of a batch waits at most ``wait_s`` for company; requests that queued while
the previous batch was running join the next one at once, so a busy server batches without
waiting at all. Inference runs on one worker thread, off the event loop, which keeps accepting
and decoding requests meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    """``await submit(item)`` -> ``(run's output for item, size of the batch it ran in)``."""

    def __init__(self, run: Callable[[list[In]], list[Out]], *, max_batch: int, wait_s: float) -> None:
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and the batch wait ({wait_s} s) >= 0")
        self.run, self.max_batch, self.wait_s = run, max_batch, wait_s
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[tuple[Out, int]]]] = asyncio.Queue()
        # One thread: batches run one after another, never competing for the CPU cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pvt-infer")
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, item: In) -> tuple[Out, int]:
        future: asyncio.Future[tuple[Out, int]] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[In, asyncio.Future[tuple[Out, int]]]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if loop.time() >= deadline:
                break
            # Not wait_for: before Python 3.12 it can drop an item that arrives as the time runs out.
            getter = loop.create_task(self._queue.get())
            await asyncio.wait({getter}, timeout=max(0.0, deadline - loop.time()))
            if not getter.done():
                getter.cancel()  # a cancelled get leaves its item in the queue
                await asyncio.gather(getter, return_exceptions=True)
            if getter.cancelled():
                break
            batch.append(getter.result())
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            items = [item for item, _ in batch]
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
                continue
            for (_, future), out in zip(batch, outs, strict=True):
                _settle(future, (out, len(batch)))

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
