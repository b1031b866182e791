"""Project data for the tests: `project_item(n)` derives every field from `n`."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Literal

from worker.parse import ProjectItem


class Derived(enum.Enum):
    """The default of a `project_item` field that is computed from the project's number."""

    FROM_N = enum.auto()


def project_item(
    n: int,
    *,
    prefix: str = "https://listing.test/projects/",
    title: str | None = None,
    description: str | None = None,
    is_active: bool | None = None,
    start_date: dt.date | Literal[Derived.FROM_N] | None = Derived.FROM_N,
) -> ProjectItem:
    """Project number `n`; every field derives from `n` unless given.

    The derived start date is a date for even `n` and none for odd `n`.
    """
    if start_date is Derived.FROM_N:
        start_date = dt.date(2024, 1, 1) + dt.timedelta(days=n) if n % 2 == 0 else None
    return ProjectItem(
        url=f"{prefix}{n}",
        title=f"Project {n}" if title is None else title,
        description=f"About project {n}." if description is None else description,
        is_active=n % 3 != 0 if is_active is None else is_active,
        start_date=start_date,
    )


def project_items(count: int, *, start: int = 0, prefix: str | None = None) -> list[ProjectItem]:
    """Projects number `start` .. `start + count - 1`."""
    if prefix is None:
        return [project_item(n) for n in range(start, start + count)]
    return [project_item(n, prefix=prefix) for n in range(start, start + count)]
