"""SOURCE_PARSER=lxml end to end: a worker harvests with it, and one whose selector cssselect
cannot translate does not start."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from projects.v1 import task_pb2
from sample_site.pages import SampleProject, render_listing
from tests.support.processes import BIN, clean_environment
from tests.support.stack import Stack, upload, wait_for_task


def test_worker_with_an_untranslatable_selector_stops_at_start_with_one_line(
    tmp_path: Path,
) -> None:
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "SOURCE_PARSER": "lxml",
        "SOURCE_PROFILE__TITLE": "h2::first-line",
    }
    result = subprocess.run(
        [str(BIN / "celery"), "-A", "worker.app", "worker", "--loglevel", "INFO"],
        env=clean_environment(env),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    said = [line for line in result.stderr.splitlines() if "SOURCE_PROFILE__TITLE" in line]
    assert said == [
        "SOURCE_PROFILE__TITLE='h2::first-line' cannot be used with SOURCE_PARSER=lxml: "
        "cssselect cannot translate it to XPath (Pseudo-elements are not supported.); change "
        "the selector, or set SOURCE_PARSER=beautifulsoup"
    ]
    assert "Traceback" not in result.stderr


def test_a_worker_with_source_parser_lxml_harvests_the_same_rows(redis_stack: Stack) -> None:
    gateway = redis_stack.start_gateway()
    redis_stack.start_worker(SOURCE_PARSER="lxml")
    listed = [
        SampleProject("Чистая река", "/p/a", "Уборка  пляжа", True, dt.date(2024, 5, 1)),
        SampleProject("Bike &amp; lanes", "/p/b", "", False, None),
        SampleProject("   ", "/p/c", "no title: skipped", True, None),
    ]
    redis_stack.site.set_page(1, render_listing(listed))

    task = wait_for_task(gateway, upload(gateway, 1).id)

    assert task.status == task_pb2.TASK_STATUS_SUCCESS, task.error
    assert (task.result.found, task.result.created, task.result.skipped) == (2, 2, 1)
    projects = redis_stack.projects()
    site = redis_stack.site.url
    assert sorted(projects) == [f"{site}/p/a", f"{site}/p/b"]
    assert projects[f"{site}/p/a"].title == "Чистая река"
    assert projects[f"{site}/p/a"].description == "Уборка пляжа"
    assert projects[f"{site}/p/b"].title == "Bike &amp; lanes"
