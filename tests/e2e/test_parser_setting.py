"""A worker with SOURCE_PARSER=lxml and a selector cssselect cannot translate does not start."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.processes import BIN, clean_environment


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
