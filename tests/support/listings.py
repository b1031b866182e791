"""Projects of a test's own for the harvester_stack's site: links no other test lists."""

from __future__ import annotations

import datetime as dt
import uuid

from devstack.testing import ListedProject


def own_projects(count: int, tag: str = "") -> list[ListedProject]:
    """`count` projects whose links are new to the database (a fresh tag each call)."""
    tag = tag or uuid.uuid4().hex[:10]
    return [
        ListedProject(
            title=f"Own project {tag} #{number}",
            href=f"/own/{tag}/{number}",
            description=f"Made up by a test ({tag}).",
            is_active=number % 2 == 0,
            start_date=dt.date(2026, 1, 1 + number % 28),
        )
        for number in range(1, count + 1)
    ]
