"""Dynamic batching: notes from requests that arrive together go through the model together.

One forward pass over 32 notes costs far less than 32 passes over one, so the service waits
up to ``max_wait_s`` for more requests after the first, up to ``max_batch`` notes, and runs
the batch in a worker thread while the event loop keeps accepting requests. When a batch fails,
its requests run again one by one, so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Pending:
    items: list[Any]
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int,
                 max_wait_s: float) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch={max_batch} (at least 1), max_wait_s={max_wait_s} "
                             "(not negative)")
        self._run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # batches run so far (for tests and logs; no endpoint shows it)

    async def submit(self, items: list[Any]) -> list[Any]:
        """The results for ``items``, in order, computed in some batch."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():  # first use, or it died
            self._worker = asyncio.create_task(self._serve())
        pending = _Pending(list(items))
        await self._queue.put(pending)
        return await pending.done

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].items)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                wait = deadline - loop.time()
                try:
                    pending = (self._queue.get_nowait() if wait <= 0
                               else await asyncio.wait_for(self._queue.get(), wait))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                batch.append(pending)
                size += len(pending.items)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        items = [item for pending in batch for item in pending.items]
        try:
            results = await asyncio.to_thread(self._run, items)
        except Exception as err:  # noqa: BLE001 - handed to the waiting request(s)
            if len(batch) > 1:  # whose input failed? each request on its own, then
                for pending in batch:
                    await self._run_batch([pending])
                return
            if not batch[0].done.done():
                batch[0].done.set_exception(err)
            return
        self.batches += 1
        start = 0
        for pending in batch:
            end = start + len(pending.items)
            if not pending.done.done():  # the client may have gone away
                pending.done.set_result(list(results[start:end]))
            start = end
