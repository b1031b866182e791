"""A real Prometheus server (Debian's `prometheus` package) scraping a test's processes.

`make test` installs the package when it is missing (`python -m tests.support.tools`); here a
missing binary skips the test, or fails it with CI=true. The server runs on a free port with a
configuration generated for the test's targets and a storage directory of its own, scraping
every half second; tests read it back through the HTTP query API.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.processes import Process, clean_environment, free_port, poll_until
from tests.support.tools import require_tool

SCRAPE_INTERVAL = "500ms"
START_TIMEOUT = 30.0


def tool(name: str) -> str:
    """A binary of Debian's prometheus package (skip without it; fail with CI=true)."""
    return require_tool(name)


def promtool_check(exposition: str) -> str:
    """What `promtool check metrics` says about an exposition (empty: nothing)."""
    checked = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    said = (checked.stdout + checked.stderr).strip()
    return said or (f"promtool exited {checked.returncode}" if checked.returncode else "")


@dataclass
class Prometheus:
    process: Process
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def by_label(self, promql: str, label: str) -> dict[str, float]:
        """`promql`'s samples as {value of `label`: number}."""
        return {
            sample["metric"].get(label, ""): float(sample["value"][1])
            for sample in self.query(promql)
        }

    def targets_up(self) -> dict[str, str]:
        response = httpx.get(f"{self.url}/api/v1/targets", timeout=10)
        response.raise_for_status()
        return {
            target["scrapeUrl"]: target["health"]
            for target in response.json()["data"]["activeTargets"]
        }


@contextmanager
def running_prometheus(directory: Path, jobs: Mapping[str, list[str]]) -> Iterator[Prometheus]:
    """Prometheus scraping `jobs` ({job name: [host:port, ...]}) until the block ends."""
    binary = tool("prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    process = Process(
        "prometheus",
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={address}",
        ],
        clean_environment({}),
        directory,
    )
    prometheus = Prometheus(process, f"http://{address}")

    def ready() -> bool:
        if process.popen.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{process.output()}")
        try:
            return httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        poll_until(ready, START_TIMEOUT, 0.2, what="prometheus ready")
        yield prometheus
    finally:
        process.stop()
