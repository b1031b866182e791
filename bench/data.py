"""The bench's inputs: listing pages of made-up projects, every link unique across pages.

Rendered by the sample site's own `render_listing`, so the markup is exactly what the worker
parses in production; the data mixes Latin and Cyrillic titles, active and inactive projects,
and projects with and without a start date, like `sample_site.pages`.
"""

from __future__ import annotations

import datetime

from core.settings import SourceProfile
from sample_site.pages import SampleProject, render_listing

PROFILE = SourceProfile()
PAGE_URL = "http://127.0.0.1:8081/projects?page={page}"
_TOPICS = ("Solar roof", "River clean-up", "Open data portal", "Bike lanes", "School garden")
_CYRILLIC = ("Городской сад", "Чистая река", "Открытые данные")


def project(number: int) -> SampleProject:
    """Project `number`: the same every call; its link is `/projects/{number}`."""
    if number % 7 == 3:
        title = f"{_CYRILLIC[number % len(_CYRILLIC)]} №{number}"
    else:
        title = f"{_TOPICS[number % len(_TOPICS)]} #{number}"
    start = None
    if number % 5 != 0:
        start = datetime.date(2024, 1, 1) + datetime.timedelta(days=(number * 37) % 700)
    return SampleProject(
        title=title,
        href=f"/projects/{number}",
        description=f"Made-up project number {number} for the benchmark & its baselines.",
        is_active=number % 4 != 0,
        start_date=start,
    )


def listing(page: int, per_page: int = 100) -> bytes:
    """Listing page `page` with `per_page` projects, numbered on from the pages before it."""
    first = (page - 1) * per_page + 1
    return render_listing([project(n) for n in range(first, first + per_page)]).encode()


def page_url(page: int) -> str:
    return PAGE_URL.format(page=page)
