"""The bench's inputs: listing pages of made-up projects, every link unique across pages.

Rendered by the sample site's own `render_listing`, so the markup is exactly what the worker
parses in production; the data mixes Latin and Cyrillic titles, active and inactive projects,
and projects with and without a start date, like `sample_site.pages`.
"""

from __future__ import annotations

from core.settings import SourceProfile
from sample_site.pages import render_listing, sample_project

PROFILE = SourceProfile()
PAGE_URL = "http://127.0.0.1:8081/projects?page={page}"


def listing(page: int, per_page: int = 100) -> bytes:
    """Listing page `page` with `per_page` projects, numbered on from the pages before it."""
    first = (page - 1) * per_page + 1
    return render_listing([sample_project(n) for n in range(first, first + per_page)]).encode()


def page_url(page: int) -> str:
    return PAGE_URL.format(page=page)
