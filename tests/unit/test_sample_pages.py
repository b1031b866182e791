"""The sample site's pages (sample_site.pages): what they list, without serving them."""

from __future__ import annotations

import re

import pytest

from sample_site.pages import SAMPLE_PAGES, sample_page


def test_sample_pages_vary_and_include_cyrillic_inactive_and_undated() -> None:
    projects = [project for page in range(1, SAMPLE_PAGES + 1) for project in sample_page(page)]

    assert len(projects) == SAMPLE_PAGES * 10
    assert len({project.href for project in projects}) == len(projects)
    assert any(re.search("[\u0400-\u04ff]", project.title) for project in projects)
    assert any(not project.is_active for project in projects)
    assert any(project.start_date is None for project in projects)
    assert sample_page(3) == sample_page(3)
    assert sample_page(2, per_page=3)[0].href == "/projects/4"


@pytest.mark.parametrize("page", [0, SAMPLE_PAGES + 1])
def test_sample_page_outside_the_site_is_an_error(page: int) -> None:
    with pytest.raises(ValueError, match="page must be within"):
        sample_page(page)
