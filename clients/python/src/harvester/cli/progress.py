"""A live progress bar for a batch, and a spinner for a task, driven by their watch streams.

The bar shows pages done of total, what was created and updated so far, the time elapsed and
an estimate of what is left; it moves when WatchBatch says something changed (rich redraws the
clock in between), and is left on the screen with the batch's final totals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harvester.calls import Batch, Task
from harvester.cli.render import status_name, styled_status


def pages_done(batch: Batch) -> int:
    return batch.pages_succeeded + batch.pages_failed + batch.pages_cancelled


def follow_batch(console: Console, states: Iterable[Task | Batch], first: Batch) -> Batch:
    """Draw `first`, then every state of `states`, until they end; the last state."""
    columns = (
        TextColumn("batch [bold]{task.fields[short_id]}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pages"),
        TextColumn("created [green]{task.fields[created]}[/]"),
        TextColumn("updated [cyan]{task.fields[updated]}[/]"),
        TextColumn("{task.fields[trouble]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    last = first
    with Progress(*columns, console=console, transient=False, refresh_per_second=8) as progress:
        initial = _fields(first)
        bar = progress.add_task("batch", total=None, short_id=first.id[:8], **initial)

        def draw(batch: Batch) -> None:
            fields = _fields(batch)
            progress.update(
                bar, completed=pages_done(batch), total=max(batch.pages_total, 1), **fields
            )

        draw(first)
        for state in states:
            if isinstance(state, Batch):
                last = state
                draw(state)
        progress.refresh()
    return last


def _fields(batch: Batch) -> dict[str, Any]:
    trouble = []
    if batch.pages_failed:
        trouble.append(f"[red]failed {batch.pages_failed}[/]")
    if batch.pages_cancelled:
        trouble.append(f"[yellow]cancelled {batch.pages_cancelled}[/]")
    return {
        "created": batch.totals.created,
        "updated": batch.totals.updated,
        "trouble": " ".join(trouble),
        "status": styled_status(batch.status),
    }


def follow_task(console: Console, states: Iterable[Task | Batch], first: Task) -> Task:
    """A spinner with the task's status until it ends; the last state."""
    last = first
    with console.status(
        f"task {first.id[:8]} page {first.page}: {status_name(first.status)}"
    ) as spinner:
        for state in states:
            if isinstance(state, Task):
                last = state
                spinner.update(
                    f"task {state.id[:8]} page {state.page}: {status_name(state.status)}"
                )
    return last
