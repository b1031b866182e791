"""collector_paused: the cyclic collector is off inside the block and as it was after it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from core.gc_tuning import collector_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    was_enabled = gc.isenabled()
    yield
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_off_inside_and_on_again_after() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_collector_is_on_again_after_the_block_raises() -> None:
    gc.enable()
    with pytest.raises(ValueError, match="a parse that failed"), collector_paused():
        raise ValueError("a parse that failed")
    assert gc.isenabled()


def test_a_collector_paused_by_someone_else_is_left_paused() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
