"""A worker whose start-up fails says why and exits, instead of consuming tasks it cannot run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.processes import BIN, clean_environment
from tests.support.services import postgres_database

pytestmark = pytest.mark.postgres


def test_a_worker_whose_database_refuses_it_exits_saying_why(tmp_path: Path) -> None:
    with postgres_database() as url:
        # The server answers, and refuses: a database that does not exist is no wait for a
        # server to come up, and no later retry makes it exist.
        env = {"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": f"{url}_absent"}
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

    assert result.returncode == 1, result.stdout + result.stderr
    assert f'database "{url.rsplit("/", 1)[1]}_absent" does not exist' in result.stderr
    assert result.stderr.rstrip().endswith("the worker runtime could not start: the worker exits")
    assert "ready." not in result.stdout + result.stderr
