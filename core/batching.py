"""Group calls that arrive together into one round trip.

Under load many calls are in flight at once: the gateway's Uploads (one INSERT of their
records, one broker pipeline for their messages) and a worker's task starts (one UPDATE of
their records, one pipeline of their events). Writing each on its own costs a round trip and a
statement each. A `Batcher` hands everything submitted while its previous flush ran (or during
the same event-loop turn) to one `flush` call, and answers every submitter with that call's
outcome. An idle process pays nothing: a lone call is flushed on the next loop turn, alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")
# What a flush says: None when every item went through, else each item's error or None.
Outcome: TypeAlias = Sequence[BaseException | None] | None


class Batcher(Generic[T]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[Outcome]], max_size: int) -> None:
        self._flush = flush
        self._max_size = max_size
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: T, *, detached: bool = False) -> None:
        """Return once `item` is flushed; raise what its flush raised (or said of it).

        An item whose submitter is cancelled before its batch is cut is never flushed, unless
        `detached`: then it is flushed whatever its submitter does. Once the flush has begun,
        the item goes with it whether or not anyone still waits.
        """
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="batcher")
        if not detached:
            await future
            return
        # Read here if its submitter has gone away, so that asyncio does not log it as lost.
        future.add_done_callback(_retrieve)
        await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._pending:
                cut = self._pending[: self._max_size]
                del self._pending[: self._max_size]
                batch = [(item, future) for item, future in cut if not future.cancelled()]
                if not batch:
                    continue
                try:
                    outcome = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                except BaseException:
                    for _, future in batch:
                        future.cancel()
                    raise
                else:
                    errors = outcome if outcome is not None else [None] * len(batch)
                    for (_, future), error in zip(batch, errors, strict=True):
                        if future.done():
                            continue
                        if error is None:
                            future.set_result(None)
                        else:
                            future.set_exception(error)
        finally:
            self._runner = None
            # Cancelled (the loop is closing): nobody is left to flush for the waiters.
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()

    async def drain(self) -> None:
        """Wait until everything submitted so far is flushed."""
        while self._runner is not None:
            await asyncio.shield(self._runner)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
