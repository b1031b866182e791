"""The contract follows buf's style guide: `buf lint` with the STANDARD rules finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parents[2] / "protos"
BUF = Path(sys.executable).parent / "buf"


def test_buf_lint_standard_is_clean() -> None:
    assert BUF.exists(), f"{BUF} is missing: the dev extra brings it (pip install buf-bin)"
    assert "STANDARD" in (PROTOS / "buf.yaml").read_text()
    result = subprocess.run(
        [str(BUF), "lint"], cwd=PROTOS, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"buf lint found:\n{result.stdout}{result.stderr}"
