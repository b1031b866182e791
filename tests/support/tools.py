"""`python -m tests.support.tools`: install the system tools the tests drive, when missing.

Debian's `prometheus` package (the server and promtool) for the metrics tests and `chromium`
for Flower's page, with apt-get (as root, or through sudo). `make test` runs this first and
says what it installs; where they cannot be installed their tests skip (`require_tool`),
except with CI=true, where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.services import in_ci

# Debian package -> the binaries the tests look for on PATH.
PACKAGES = {"prometheus": ("prometheus", "promtool"), "chromium": ("chromium",)}


def require_tool(binary: str) -> str:
    """The path of `binary`; skip the test without it (fail it with CI=true)."""
    found = shutil.which(binary)
    if found is None:
        package = next((p for p, names in PACKAGES.items() if binary in names), binary)
        message = f"{binary} is not installed (make test installs it: apt-get install {package})"
        if in_ci():
            pytest.fail(f"{message}, and CI=true requires it")
        pytest.skip(message)
    return found


def _apt_get(*args: str) -> int:
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    command = [*prefix, "apt-get", "-q", "-y", *args]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, env=env, check=False).returncode


def main() -> int:
    missing = [
        package
        for package, binaries in PACKAGES.items()
        if not all(shutil.which(binary) for binary in binaries)
    ]
    if not missing:
        return 0
    if shutil.which("apt-get") is None:
        print(f"tests: {', '.join(missing)} missing and no apt-get; their tests will skip")
        return 0
    print(f"tests: installing Debian's {', '.join(missing)} for the observability tests (apt-get)")
    # An install from a stale package list can fail; refresh it once and try again.
    if _apt_get("install", "--no-install-recommends", *missing) != 0:
        _apt_get("update")
        if _apt_get("install", "--no-install-recommends", *missing) != 0:
            print(f"tests: could not install {', '.join(missing)}; their tests will skip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
