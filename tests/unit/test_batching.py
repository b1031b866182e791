"""The Batcher: calls in flight together share one flush, and each learns that flush's outcome."""

from __future__ import annotations

import asyncio

import pytest

from core.batching import Batcher


class _Recorder:
    def __init__(self, fail_with: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_with = fail_with
        self.release = asyncio.Event()
        self.release.set()

    async def flush(self, items: list[int]) -> None:
        self.batches.append(items)
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with


async def test_calls_in_the_same_turn_share_one_flush() -> None:
    recorder = _Recorder()
    batcher = Batcher(recorder.flush, max_size=100)
    await asyncio.gather(*(batcher.submit(n) for n in range(10)))
    assert recorder.batches == [list(range(10))]


async def test_calls_during_a_flush_go_out_together_in_the_next() -> None:
    recorder = _Recorder()
    recorder.release.clear()
    batcher = Batcher(recorder.flush, max_size=100)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)  # the first flush starts and waits
    later = [asyncio.ensure_future(batcher.submit(n)) for n in range(1, 5)]
    await asyncio.sleep(0)
    assert recorder.batches == [[0]]
    recorder.release.set()
    await asyncio.gather(first, *later)
    assert recorder.batches == [[0], [1, 2, 3, 4]]


async def test_batches_are_cut_at_max_size() -> None:
    recorder = _Recorder()
    batcher = Batcher(recorder.flush, max_size=3)
    await asyncio.gather(*(batcher.submit(n) for n in range(7)))
    assert recorder.batches == [[0, 1, 2], [3, 4, 5], [6]]


async def test_every_caller_of_a_failed_flush_gets_its_error() -> None:
    recorder = _Recorder(fail_with=ConnectionError("broker gone"))
    batcher = Batcher(recorder.flush, max_size=100)
    outcomes = await asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True)
    assert [type(o) for o in outcomes] == [ConnectionError] * 3
    recorder.fail_with = None
    await batcher.submit(9)  # the next flush is unaffected
    assert recorder.batches[-1] == [9]


async def test_a_caller_cancelled_before_its_batch_is_cut_is_left_out() -> None:
    recorder = _Recorder()
    recorder.release.clear()
    batcher = Batcher(recorder.flush, max_size=100)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)  # the first flush starts and waits
    gone = asyncio.ensure_future(batcher.submit(1))
    kept = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    recorder.release.set()
    await asyncio.gather(first, kept)
    assert recorder.batches == [[0], [2]]


async def test_a_caller_cancelled_during_its_flush_is_still_flushed() -> None:
    recorder = _Recorder()
    recorder.release.clear()
    batcher = Batcher(recorder.flush, max_size=100)
    caller = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert recorder.batches == [[1]]
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    recorder.release.set()
    await batcher.drain()
    assert recorder.batches == [[1]]


async def test_each_caller_gets_its_own_outcome_when_the_flush_gives_them() -> None:
    async def flush(items: list[int]) -> list[BaseException | None]:
        return [None if item % 2 == 0 else TimeoutError(f"item {item}") for item in items]

    batcher = Batcher(flush, max_size=100)
    outcomes = await asyncio.gather(*(batcher.submit(n) for n in range(4)), return_exceptions=True)
    assert [None if o is None else str(o) for o in outcomes] == [None, "item 1", None, "item 3"]
