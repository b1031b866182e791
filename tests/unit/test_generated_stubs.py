"""The committed stubs are what `make proto` makes from protos/ now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from google.type import date_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GENERATED = PROTOS / "projects" / "v1"
# Where googleapis-common-protos keeps google/type/date.proto, which the contract imports.
GOOGLEAPIS = Path(date_pb2.__file__).parents[2]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    sources = sorted(GENERATED.glob("*.proto"))
    assert sources, "no .proto files in protos/projects/v1"
    env_path = f"{Path(sys.executable).parent}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{GOOGLEAPIS}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            *map(str, sources),
        ],
        capture_output=True,
        text=True,
        env={"PATH": env_path + ":/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    committed = sorted(p.relative_to(PROTOS) for p in GENERATED.glob("*_pb2*"))
    assert fresh == committed, "stub files differ: run `make proto` and commit"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (PROTOS / p).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit the result"


def test_committed_descriptor_set_is_fresh(tmp_path: Path) -> None:
    """The descriptor set that reflection serves (comments included) is today's contract."""
    fresh = tmp_path / "descriptor_set.binpb"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{GOOGLEAPIS}",
            "--include_source_info",
            "--include_imports",
            f"--descriptor_set_out={fresh}",
            *map(str, sorted(GENERATED.glob("*.proto"))),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    committed = GENERATED / "descriptor_set.binpb"
    assert committed.exists(), "no descriptor set: run `make proto` and commit it"
    assert fresh.read_bytes() == committed.read_bytes(), (
        "stale descriptor set: run `make proto` and commit the result"
    )


def test_stub_generator_is_on_path() -> None:
    assert shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
