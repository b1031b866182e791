"""The sample site's content: made-up projects and the HTML listing format the worker parses.

`render_listing` writes exactly the markup the default `SourceProfile` expects, so tests can
render any list of projects and parse it back; `sample_page` is the fixed data set the sample
server shows on pages 1..SAMPLE_PAGES.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

SAMPLE_PAGES = 20
DEFAULT_PER_PAGE = 10

_TOPICS = (
    "Solar roof",
    "River clean-up",
    "Open data portal",
    "Bike lanes",
    "School garden",
    "Library app",
    "Water sensors",
    "Community radio",
)
# A few titles are Cyrillic so that every run of the stack carries non-ASCII text end to end.
_CYRILLIC_TOPICS = ("Городской сад", "Чистая река", "Открытые данные")


@dataclass(frozen=True, slots=True)
class SampleProject:
    """One project as the sample site shows it; `href` may be relative."""

    title: str
    href: str
    description: str
    is_active: bool
    start_date: datetime.date | None


def sample_page(
    page: int, per_page: int = DEFAULT_PER_PAGE, pages: int = SAMPLE_PAGES
) -> list[SampleProject]:
    """The projects of `page` (1..pages): the same every call, numbered across pages."""
    if not 1 <= page <= pages:
        raise ValueError(f"page must be within 1..{pages}, not {page}")
    if per_page < 1:
        raise ValueError(f"per_page must be at least 1, not {per_page}")
    first = (page - 1) * per_page + 1
    return [sample_project(number) for number in range(first, first + per_page)]


def sample_project(number: int) -> SampleProject:
    """Project `number` (numbered across pages): the same every call, linked at /projects/N."""
    # Plain arithmetic on the number keeps the data deterministic without a seeded RNG.
    if number % 7 == 3:
        title = f"{_CYRILLIC_TOPICS[number % len(_CYRILLIC_TOPICS)]} №{number}"
    else:
        title = f"{_TOPICS[number % len(_TOPICS)]} #{number}"
    start: datetime.date | None = None
    if number % 5 != 0:
        start = datetime.date(2024, 1, 1) + datetime.timedelta(days=(number * 37) % 700)
    return SampleProject(
        title=title,
        href=f"/projects/{number}",
        description=f"Made-up project number {number} for the sample site & its tests.",
        is_active=number % 4 != 0,
        start_date=start,
    )


def render_listing(projects: Sequence[SampleProject]) -> str:
    """A full HTML5 page listing `projects` in the format of the default `SourceProfile`."""
    articles = "\n".join(_render_project(project) for project in projects)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n'
        "<head>\n"
        '<meta charset="utf-8">\n'
        "<title>Projects</title>\n"
        "</head>\n"
        "<body>\n"
        "<main>\n"
        f"{articles}\n"
        "</main>\n"
        "</body>\n"
        "</html>\n"
    )


def _render_project(project: SampleProject) -> str:
    css_class = "project is-active" if project.is_active else "project"
    start = ""
    if project.start_date is not None:
        day = project.start_date
        # Formatted by hand: strftime("%Y") does not zero-pad years below 1000 on every libc.
        start = (
            f'\n  <time class="project-start" datetime="{day.isoformat()}">'
            f"{day.day:02d}.{day.month:02d}.{day.year:04d}</time>"
        )
    return (
        f'<article class="{css_class}">\n'
        f'  <h2 class="project-title"><a href="{escape(project.href)}">'
        f"{escape(project.title)}</a></h2>\n"
        f'  <p class="project-description">{escape(project.description)}</p>'
        f"{start}\n"
        "</article>"
    )
