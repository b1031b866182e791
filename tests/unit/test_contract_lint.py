"""The contract follows buf's style guide: `buf lint` with the STANDARD rules finds nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from google.type import date_pb2

PROTOS = Path(__file__).resolve().parents[2] / "protos"
BUF = Path(sys.executable).parent / "buf"
# The googleapis files the contract imports, as googleapis-common-protos ships them.
IMPORTED = ("google/type/date.proto",)


def test_buf_lint_standard_is_clean(tmp_path: Path) -> None:
    assert BUF.exists(), f"{BUF} is missing: the dev extra brings it (pip install buf-bin)"
    assert "STANDARD" in (PROTOS / "buf.yaml").read_text()
    # buf resolves imports within its workspace (or from the network, which tests never use):
    # the contract, with the googleapis files it imports beside it and left out of the lint.
    workspace = tmp_path / "protos"
    shutil.copytree(PROTOS, workspace, ignore=shutil.ignore_patterns("*.py", "*.pyi", "*.binpb"))
    googleapis = Path(date_pb2.__file__).parents[2]
    for name in IMPORTED:
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(googleapis / name, workspace / name)
    result = subprocess.run(
        [str(BUF), "lint"], cwd=workspace, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"buf lint found:\n{result.stdout}{result.stderr}"
