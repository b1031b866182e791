"""docker-compose.yml and the Dockerfile agree with the Compose specification and with the code.

There is no Docker here, so these check what can be checked without running the stack: the
file's shape (the Compose specification's JSON schema, as check-jsonschema ships it), that every
variable is a setting and its value one `Settings` accepts, that the commands name modules that
exist, that the gateway listens where it is published, and that its healthcheck really tells
SERVING from NOT_SERVING.
"""

from __future__ import annotations

import ast
import copy
import importlib.resources
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel, ValidationError

from core.settings import Settings
from tests.support.processes import clean_environment

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# The Compose specification's schema as check-jsonschema (a dev dependency, pinned in
# constraints.txt) vendors it for its `--builtin-schema vendor.compose-spec`.
SCHEMA_PACKAGE = "check_jsonschema.builtin_schemas.vendor"
SCHEMA_RESOURCE = "compose-spec.json"

APP_SERVICES = ("gateway", "worker")
# Stand-ins for the `${VAR:?...}` variables the operator must set; each must be a valid value.
REQUIRED_PLACEHOLDERS = {
    "API_TOKENS": "ci:token",
    "SOURCE_URL": "http://example.com/p?page={page}",
}
# Without these, each container would fall back to its own embedded Redis and SQLite file
# (core/celery_config.py, Settings.resolved_database_url) and never see the others' work.
SHARED_DEPENDENCIES = ("CELERY_BROKER_URL", "DATABASE_URL")
# ...and these must be equal on both sides (the result backend defaults to the broker).
SHARED_SETTINGS = (*SHARED_DEPENDENCIES, "CELERY_RESULT_BACKEND")
# What each service cannot run without in a container, and why.
REQUIRED_VARIABLES = {
    "gateway": {
        "GATEWAY_ADDRESS": "the default listens on 127.0.0.1, unreachable from outside",
        "API_TOKENS": "without it every start prints a new random token nobody else knows",
    },
    "worker": {"SOURCE_URL": "the default points at the sample site on 127.0.0.1"},
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
PYTHON_HEALTHCHECK = ["CMD", "python", "-c"]

# Compose's variable interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
# ${VAR?error}, ${VAR:+alt}, $VAR; any other `$` is an error in Compose.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate(value: str, where: str) -> str:
    """`value` as Compose would run it with no variable set except the required placeholders."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None:
            pytest.fail(f"{where}: a lone `$` in {value!r}; write `$$` for a literal dollar sign")
        name = match["braced"] or match["named"]
        op = match["op"]
        if op in (":-", "-"):
            return match["arg"]
        if op in (":?", "?"):
            if name in REQUIRED_PLACEHOLDERS:
                return REQUIRED_PLACEHOLDERS[name]
            pytest.fail(
                f"{where}: ${{{name}:?...}} is required but REQUIRED_PLACEHOLDERS in {__file__} "
                f"has no stand-in value for {name}; add one that Settings accepts"
            )
        pytest.fail(
            f"{where}: {match[0]} becomes an empty string when {name} is unset; give it a "
            f"default (${{{name}:-value}}) or make it required (${{{name}:?message}})"
        )

    return _INTERPOLATION.sub(substitute, value)


def setting_names() -> set[str]:
    """Every environment variable `Settings` reads, nested models included (SOURCE_PROFILE__X)."""
    prefix = str(Settings.model_config.get("env_prefix") or "").upper()
    delimiter = str(Settings.model_config.get("env_nested_delimiter") or "")
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        nested = field.annotation
        if delimiter and isinstance(nested, type) and issubclass(nested, BaseModel):
            names |= {f"{prefix}{name}{delimiter}{sub}".upper() for sub in nested.model_fields}
    return names


def settings_arguments(name: str) -> list[str]:
    """The path of keyword arguments to `Settings` that variable `name` sets."""
    prefix = str(Settings.model_config.get("env_prefix") or "").upper()
    delimiter = str(Settings.model_config.get("env_nested_delimiter") or "")
    bare = name.upper().removeprefix(prefix).lower()
    return bare.split(delimiter) if delimiter else [bare]


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as name -> raw value (None: passed through from the host)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {name: value if sep else None for name, sep, value in pairs}
    return {str(name): None if value is None else str(value) for name, value in raw.items()}


def command(service: dict[str, Any]) -> list[str]:
    raw = service.get("command")
    if raw is None:
        return []
    return shlex.split(raw) if isinstance(raw, str) else [str(arg) for arg in raw]


def module_assigns(path: Path, name: str) -> bool:
    """Whether the module at `path` binds `name` at its top level."""
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return True
    return False


def module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, (
        f"docker-compose.yml runs module {module!r}, which is not importable from the project; "
        "fix the command or the module's path"
    )
    return Path(spec.origin)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict), f"{COMPOSE_FILE} must be a YAML mapping"
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose.get("services") or {}
    missing = [name for name in APP_SERVICES if name not in found]
    assert not missing, f"docker-compose.yml has no service {missing}; the tests expect both"
    return found


@pytest.fixture
def no_settings_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built in a test see only what the test passes, not a developer's exports."""
    known = setting_names()
    for name in [name for name in os.environ if name.upper() in known]:
        monkeypatch.delenv(name)


def build_settings(values: dict[str, str]) -> Settings:
    """`Settings` from variables as the environment would give them, ignoring any `.env`."""
    arguments: dict[str, Any] = {}
    for name, value in values.items():
        *parents, leaf = settings_arguments(name)
        target = arguments
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return Settings(_env_file=None, **arguments)


def deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The innermost cause of a oneOf/anyOf failure: the branch that got furthest into the file."""
    causes = [deepest(cause) for cause in error.context or ()]
    return max(causes, key=lambda cause: len(cause.absolute_path), default=error)


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    try:
        resource = importlib.resources.files(SCHEMA_PACKAGE).joinpath(SCHEMA_RESOURCE)
        schema = json.loads(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.fail(
            f"no {SCHEMA_RESOURCE} in {SCHEMA_PACKAGE} ({exc}): install the dev dependencies "
            "(`make setup`); if check-jsonschema moved its vendored schemas, update SCHEMA_PACKAGE"
        )
    # The schema names its draft ($schema); the validator for that draft checks it first.
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def schema_problems(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    problems = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.path))):
        detail = deepest(error)
        where = "/".join(map(str, detail.absolute_path)) or "<top level>"
        problems.append(f"  {where}: {detail.message}")
    return problems


def test_compose_file_matches_the_compose_specification(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator
) -> None:
    problems = schema_problems(compose_validator, compose)
    assert not problems, "docker-compose.yml breaks the Compose specification:\n" + "\n".join(
        problems
    )


def test_the_schema_rejects_what_compose_would(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator
) -> None:
    """The schema check can fail: a misspelt key and a wrong type in a copy of the file."""
    broken = copy.deepcopy(compose)
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop(
        "healthcheck", {}
    )
    broken["services"]["worker"]["ports"] = "50051"
    problems = "\n".join(schema_problems(compose_validator, broken))
    assert "helthcheck" in problems, problems
    assert "services/worker/ports" in problems, problems


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_variable_is_a_setting(services: dict[str, dict[str, Any]], service: str) -> None:
    unknown = sorted(set(environment(services[service])) - setting_names())
    assert not unknown, (
        f"docker-compose.yml sets {unknown} on {service}, which core.settings.Settings does not "
        "read (it ignores unknown variables silently): fix the spelling, or add the setting to "
        "core/settings.py"
    )


@pytest.mark.parametrize("service", APP_SERVICES)
def test_services_set_what_a_container_needs(
    services: dict[str, dict[str, Any]], service: str
) -> None:
    env = environment(services[service])
    needed = dict.fromkeys(SHARED_DEPENDENCIES, "gateway and worker must meet there")
    needed |= REQUIRED_VARIABLES[service]
    missing = [f"{name} ({why})" for name, why in needed.items() if env.get(name) is None]
    assert not missing, f"docker-compose.yml: {service} must set " + "; ".join(missing)


def test_gateway_and_worker_share_broker_and_database(services: dict[str, dict[str, Any]]) -> None:
    gateway, worker = (environment(services[name]) for name in APP_SERVICES)
    differing = [name for name in SHARED_SETTINGS if gateway.get(name) != worker.get(name)]
    assert not differing, (
        f"docker-compose.yml gives gateway and worker different {differing}: tasks the gateway "
        "publishes or records would never reach the worker; set them once in x-app-env"
    )


@pytest.mark.usefixtures("no_settings_in_environment")
@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_value_is_accepted_by_settings(
    services: dict[str, dict[str, Any]], service: str
) -> None:
    values = {
        name: interpolate(raw, f"{service}.environment.{name}")
        for name, raw in environment(services[service]).items()
        if raw is not None
    }
    rejected = []
    for name, value in values.items():
        try:
            build_settings({name: value})
        except ValidationError as exc:
            reasons = "; ".join(error["msg"] for error in exc.errors())
            rejected.append(f"  {name}={value!r}: {reasons}")
    assert not rejected, (
        f"core.settings.Settings rejects values docker-compose.yml gives {service} (required "
        "variables stand in as REQUIRED_PLACEHOLDERS, others take their ${VAR:-default}):\n"
        + "\n".join(rejected)
    )
    try:
        build_settings(values)
    except ValidationError as exc:
        pytest.fail(f"{service}'s environment is rejected as a whole (a cross-setting rule): {exc}")


def test_gateway_listens_where_it_is_published(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    raw = environment(gateway).get("GATEWAY_ADDRESS")
    assert raw is not None, "docker-compose.yml: gateway must set GATEWAY_ADDRESS"
    host, _, port = interpolate(raw, "gateway.environment.GATEWAY_ADDRESS").rpartition(":")
    assert host not in LOOPBACK_HOSTS, (
        f"gateway's GATEWAY_ADDRESS listens on {host}, which a published port cannot reach in a "
        "container; use 0.0.0.0"
    )
    published = set()
    for entry in gateway.get("ports") or []:
        if isinstance(entry, dict):
            published.add(str(entry.get("target")))
        else:
            published.add(str(entry).rpartition(":")[2].split("/")[0])
    assert port in published, (
        f"gateway listens on container port {port} (GATEWAY_ADDRESS) but publishes "
        f"{sorted(published)}: make the `ports` entry's container side {port}"
    )


def test_gateway_command_is_the_gateway_module(services: dict[str, dict[str, Any]]) -> None:
    assert command(services["gateway"]) == ["python", "-m", "gateway"], (
        "gateway's command must be `python -m gateway`, the entry point gateway/__main__.py"
    )
    main = module_file("gateway.__main__")
    tree = ast.parse(main.read_text(), str(main))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "main" in functions, f"{main} defines no main(); `python -m gateway` needs one"


def test_image_default_command_is_the_gateway(services: dict[str, dict[str, Any]]) -> None:
    commands = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert commands, f"{DOCKERFILE} has no CMD; the image should run the gateway by default"
    assert json.loads(commands[-1].removeprefix("CMD ")) == command(services["gateway"]), (
        f"{DOCKERFILE}'s CMD must be the gateway's compose command, in exec form"
    )


def test_worker_command_names_the_celery_app(services: dict[str, dict[str, Any]]) -> None:
    args = command(services["worker"])
    assert args[:1] == ["celery"], f"worker's command must start with `celery`, not {args[:1]}"
    app, subcommand = None, None
    arguments = iter(args[1:])
    for arg in arguments:
        if arg in ("-A", "--app"):
            app = next(arguments, None)
        elif arg.startswith("--app="):
            app = arg.removeprefix("--app=")
        elif not arg.startswith("-"):
            subcommand = arg
            break
    assert app is not None, "worker's command needs `-A worker.app` before the `worker` subcommand"
    assert subcommand == "worker", (
        f"worker's command runs celery's {subcommand!r} subcommand; it must run `worker`"
    )
    pools = [value for flag, value in itertools.pairwise(args) if flag in ("-P", "--pool")]
    pools += [arg.removeprefix("--pool=") for arg in args if arg.startswith("--pool=")]
    assert set(pools) <= {"threads"}, (
        f"worker's command selects pool {pools}; the worker's runtime (one event loop per "
        "process, worker/runtime.py) needs `threads`, which the settings select already"
    )
    module, _, attribute = app.partition(":")
    path = module_file(module)
    # Importing worker.app would build the Celery app (and maybe start an embedded Redis).
    assert module_assigns(path, attribute or "app"), (
        f"{path} binds no top-level `{attribute or 'app'}`, the Celery app `-A {app}` looks for"
    )


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, int]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [(health_pb2.HealthCheckResponse.SERVING, 0), (health_pb2.HealthCheckResponse.NOT_SERVING, 1)],
    ids=["SERVING", "NOT_SERVING"],
)
def test_gateway_healthcheck_tells_serving_from_not(
    services: dict[str, dict[str, Any]],
    health_server: tuple[health.HealthServicer, int],
    tmp_path: Path,
    status: int,
    exit_code: int,
) -> None:
    test = (services["gateway"].get("healthcheck") or {}).get("test") or []
    assert test[: len(PYTHON_HEALTHCHECK)] == PYTHON_HEALTHCHECK and len(test) == 4, (
        "gateway's healthcheck must be [CMD, python, -c, <code>] so this test can run the code"
    )
    servicer, port = health_server
    servicer.set("", status)
    # The code finds the port through the settings, as it does in the container.
    env = clean_environment({"GATEWAY_ADDRESS": f"0.0.0.0:{port}"})
    result = subprocess.run(
        [sys.executable, "-c", test[-1]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == exit_code, (
        f"gateway's healthcheck exited {result.returncode} for a gateway reporting "
        f"{health_pb2.HealthCheckResponse.ServingStatus.Name(status)}, expected {exit_code}:\n"
        f"{result.stderr}"
    )
