"""Settings read from the environment: defaults, parsing, and validators that name the variable."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import (
    DEFAULT_GATEWAY_ADDRESS,
    DEFAULT_SAMPLE_SITE_ADDRESS,
    ApiToken,
    Settings,
    SourceProfile,
    describe_settings_error,
)
from tests.unit.helpers import clear_settings_environment


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """monkeypatch over an environment without any of the settings' variables."""
    clear_settings_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)  # and no .env the process might find
    return monkeypatch


def settings(env: pytest.MonkeyPatch, **variables: str) -> Settings:
    """Settings from exactly these environment variables (and no .env file)."""
    for name, value in variables.items():
        env.setenv(name, value)
    return Settings(_env_file=None)


def rejected(env: pytest.MonkeyPatch, **variables: str) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        settings(env, **variables)
    return caught.value


def test_defaults(env: pytest.MonkeyPatch) -> None:
    defaults = settings(env)
    sample_site_listing = f"http://{DEFAULT_SAMPLE_SITE_ADDRESS}/projects?page={{page}}"

    assert defaults.gateway_address == DEFAULT_GATEWAY_ADDRESS
    assert defaults.api_tokens == []
    assert defaults.source_url == sample_site_listing
    assert defaults.source_profile == SourceProfile()
    assert defaults.celery_broker_url is None
    assert defaults.celery_result_backend is None
    assert defaults.database_url is None
    assert defaults.retry_base_delay_seconds == 1.0
    assert defaults.task_soft_time_limit_seconds < defaults.task_time_limit_seconds
    assert defaults.broker_visibility_timeout_seconds > (
        defaults.task_time_limit_seconds + defaults.retry_after_cap_seconds
    )
    assert defaults.resolved_database_url == (
        f"sqlite+aiosqlite:///{(Path('data') / 'projects.db').resolve()}"
    )
    assert defaults.page_url(7) == f"http://{DEFAULT_SAMPLE_SITE_ADDRESS}/projects?page=7"


def test_variables_are_read_case_insensitively(env: pytest.MonkeyPatch) -> None:
    read = settings(env, max_page="12", WORKER_CONCURRENCY="3")

    assert (read.max_page, read.worker_concurrency) == (12, 3)


# --- API_TOKENS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["a:x,b:y", " a : x , b:y ", "a:x,,b:y,", "\ta:x,\n b:y\n"],
)
def test_api_tokens_are_parsed_into_names_and_tokens(env: pytest.MonkeyPatch, raw: str) -> None:
    assert settings(env, API_TOKENS=raw).api_tokens == [
        ApiToken(name="a", token="x"),
        ApiToken(name="b", token="y"),
    ]


def test_token_may_contain_a_colon(env: pytest.MonkeyPatch) -> None:
    # Only the first colon separates the name.
    assert settings(env, API_TOKENS="ops:abc:def").api_tokens == [
        ApiToken(name="ops", token="abc:def")
    ]


@pytest.mark.parametrize("raw", ["", " ", ","])
def test_empty_api_tokens_mean_none(env: pytest.MonkeyPatch, raw: str) -> None:
    assert settings(env, API_TOKENS=raw).api_tokens == []


@pytest.mark.parametrize("bad", ["nocolon", "name:", ":lone-secret", " : "])
def test_bad_api_tokens_entry_is_rejected_naming_the_field(
    env: pytest.MonkeyPatch, bad: str
) -> None:
    error = rejected(env, API_TOKENS=f"alpha:first-secret,{bad},beta:second-secret")

    [detail] = error.errors()
    assert detail["loc"] == ("api_tokens",)
    assert "must look like name:token" in detail["msg"]
    assert "API_TOKENS" in detail["msg"]
    assert "api_tokens" in str(error)
    # The explanation itself quotes no token, neither the other entries' nor the bad one's.
    assert "secret" not in detail["msg"]


def test_bad_api_tokens_error_text_holds_no_token(env: pytest.MonkeyPatch) -> None:
    error = rejected(env, API_TOKENS="alpha:first-secret,nocolon,beta:second-secret")

    assert "api_tokens" in str(error)
    assert "first-secret" not in str(error)
    assert "second-secret" not in str(error)


def test_an_entry_without_a_name_is_reported_by_position_not_echoed(
    env: pytest.MonkeyPatch,
) -> None:
    error = rejected(env, API_TOKENS="billing:x,S3CRET-ALONE")

    assert "entry #2" in str(error)
    assert "S3CRET" not in str(error)


def test_a_client_name_longer_than_the_column_is_rejected(env: pytest.MonkeyPatch) -> None:
    error = rejected(env, API_TOKENS=f"{'n' * 65}:token")

    assert "longer than 64" in str(error)


def test_duplicate_api_token_names_are_rejected(env: pytest.MonkeyPatch) -> None:
    error = rejected(env, API_TOKENS="a:x,a:y")

    assert "names must be unique" in str(error)


# --- SOURCE_URL and SOURCE_PROFILE --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8081/projects?page=1",
        "ftp://127.0.0.1/projects?page={page}",
        "127.0.0.1:8081/projects?page={page}",
    ],
)
def test_source_url_must_be_http_with_a_page_placeholder(env: pytest.MonkeyPatch, url: str) -> None:
    error = rejected(env, SOURCE_URL=url)

    [detail] = error.errors()
    assert detail["loc"] == ("source_url",)
    assert "SOURCE_URL" in detail["msg"]


def test_source_url_template_gives_page_urls(env: pytest.MonkeyPatch) -> None:
    read = settings(env, SOURCE_URL="https://listing.test/p/{page}/?sort=new")

    assert read.page_url(42) == "https://listing.test/p/42/?sort=new"


def test_nested_variable_overrides_one_selector_of_the_profile(env: pytest.MonkeyPatch) -> None:
    read = settings(env, SOURCE_PROFILE__ITEM="article.card", source_profile__title="h2")

    assert read.source_profile == SourceProfile(item="article.card", title="h2")


@pytest.mark.parametrize("parser", ["beautifulsoup", "lxml"])
def test_source_parser_is_one_of_the_two(env: pytest.MonkeyPatch, parser: str) -> None:
    assert settings(env).source_parser == "beautifulsoup"
    assert settings(env, SOURCE_PARSER=parser).source_parser == parser


def test_an_unknown_source_parser_is_rejected_naming_the_variable(
    env: pytest.MonkeyPatch,
) -> None:
    lines = describe_settings_error(rejected(env, SOURCE_PARSER="html5lib"))

    assert len(lines) == 1
    assert "SOURCE_PARSER" in lines[0]
    assert "'beautifulsoup' or 'lxml'" in lines[0]


# --- time limits and the broker -----------------------------------------------------------------


# --- politeness ----------------------------------------------------------------------------------


def test_politeness_defaults_are_the_issues(env: pytest.MonkeyPatch) -> None:
    defaults = settings(env)

    assert defaults.source_max_requests_per_second == 5.0
    assert defaults.source_max_concurrency == 8
    assert defaults.source_obey_robots is True
    assert defaults.source_lease_seconds > defaults.fetch_timeout_seconds
    # Name, version (the installed distribution's) and a contact.
    version = importlib.metadata.version("projects-harvester")
    assert defaults.source_user_agent == (
        f"projects-harvester/{version} (+https://example.invalid/contact)"
    )


@pytest.mark.parametrize(("lease", "fetch"), [("10", "10"), ("5", "10")])
def test_a_slot_lease_must_outlast_a_fetch(env: pytest.MonkeyPatch, lease: str, fetch: str) -> None:
    error = rejected(env, SOURCE_LEASE_SECONDS=lease, FETCH_TIMEOUT_SECONDS=fetch)

    assert "SOURCE_LEASE_SECONDS must exceed FETCH_TIMEOUT_SECONDS" in str(error)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SOURCE_MAX_REQUESTS_PER_SECOND", "0"),
        ("SOURCE_MAX_CONCURRENCY", "0"),
        ("ROBOTS_TTL_SECONDS", "0"),
        ("SOURCE_USER_AGENT", ""),
    ],
)
def test_politeness_settings_are_bounded(
    env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    assert variable in str(rejected(env, **{variable: value})).upper()


@pytest.mark.parametrize(("soft", "hard"), [("150", "150"), ("200", "150")])
def test_soft_time_limit_must_be_below_the_hard_one(
    env: pytest.MonkeyPatch, soft: str, hard: str
) -> None:
    error = rejected(env, TASK_SOFT_TIME_LIMIT_SECONDS=soft, TASK_TIME_LIMIT_SECONDS=hard)

    assert "TASK_SOFT_TIME_LIMIT_SECONDS must be below TASK_TIME_LIMIT_SECONDS" in str(error)


def test_soft_time_limit_just_below_the_hard_one_is_accepted(env: pytest.MonkeyPatch) -> None:
    read = settings(env, TASK_SOFT_TIME_LIMIT_SECONDS="149.5", TASK_TIME_LIMIT_SECONDS="150")

    assert read.task_soft_time_limit_seconds == 149.5


@pytest.mark.parametrize(
    ("visibility", "cap", "accepted"),
    [("210", "60", False), ("100", "60", False), ("211", "60", True), ("160", "10", False)],
)
def test_visibility_timeout_must_exceed_time_limit_plus_retry_after_cap(
    env: pytest.MonkeyPatch, visibility: str, cap: str, accepted: bool
) -> None:
    variables = {
        "BROKER_VISIBILITY_TIMEOUT_SECONDS": visibility,
        "RETRY_AFTER_CAP_SECONDS": cap,
        "RETRY_MAX_DELAY_SECONDS": "1",
        "TASK_TIME_LIMIT_SECONDS": "150",
    }
    if accepted:
        assert settings(env, **variables).broker_visibility_timeout_seconds == int(visibility)
        return
    error = rejected(env, **variables)
    assert "BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed" in str(error)
    assert f"({150 + int(cap)})" in str(error)


def test_visibility_timeout_must_exceed_time_limit_plus_the_longest_backoff(
    env: pytest.MonkeyPatch,
) -> None:
    # A retry held by a worker until its countdown is as much a held message as a running task.
    error = rejected(
        env,
        BROKER_VISIBILITY_TIMEOUT_SECONDS="200",
        RETRY_AFTER_CAP_SECONDS="10",
        RETRY_MAX_DELAY_SECONDS="60",
        TASK_TIME_LIMIT_SECONDS="150",
    )
    assert "(210)" in str(error)


@pytest.mark.parametrize("broker", ["amqp://guest:guest@127.0.0.1:5672//", "pyamqp://127.0.0.1//"])
def test_amqp_broker_needs_a_result_backend(env: pytest.MonkeyPatch, broker: str) -> None:
    error = rejected(env, CELERY_BROKER_URL=broker)

    assert "CELERY_RESULT_BACKEND must be set" in str(error)
    read = settings(env, CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND="redis://127.0.0.1/1")
    assert read.celery_result_backend == "redis://127.0.0.1/1"


def test_redis_broker_needs_no_result_backend(env: pytest.MonkeyPatch) -> None:
    assert settings(env, CELERY_BROKER_URL="redis://127.0.0.1:6379/0").celery_result_backend is None


# --- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost:", ":50051", "host:port", "[::1]"])
def test_gateway_address_without_a_port_is_rejected(env: pytest.MonkeyPatch, address: str) -> None:
    error = rejected(env, GATEWAY_ADDRESS=address)

    [detail] = error.errors()
    assert detail["loc"] == ("gateway_address",)
    assert "must look like host:port" in detail["msg"]


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::1]:50051", "gateway.internal:8443"])
def test_gateway_address_with_a_port_is_accepted(env: pytest.MonkeyPatch, address: str) -> None:
    assert settings(env, GATEWAY_ADDRESS=address).gateway_address == address


def test_several_gateway_processes_need_a_fixed_port(env: pytest.MonkeyPatch) -> None:
    error = rejected(env, GATEWAY_PROCESSES="2", GATEWAY_ADDRESS="127.0.0.1:0")
    assert "GATEWAY_PROCESSES above 1 needs a fixed port" in str(error)
    fixed = settings(env, GATEWAY_PROCESSES="2", GATEWAY_ADDRESS="127.0.0.1:50051")
    assert fixed.gateway_processes == 2


# --- observability ---


def test_observability_is_off_by_default(env: pytest.MonkeyPatch) -> None:
    read = settings(env)

    assert read.gateway_metrics_address is None
    assert read.worker_metrics_address is None
    assert read.log_format == "text"
    assert not read.traces_exported
    assert read.task_events


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
def test_either_standard_otlp_endpoint_turns_tracing_on(
    env: pytest.MonkeyPatch, variable: str
) -> None:
    assert settings(env, **{variable: "http://127.0.0.1:4318"}).traces_exported


ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    ("variables", "exported"),
    [
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": " OTLP "}, True),
        ({"OTEL_TRACES_EXPORTER": ""}, True),  # empty: the default, otlp
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "None"}, False),
        ({"OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_SDK_DISABLED": "false"}, True),
        # Only "true" is true for the specification: no other value may disable the SDK.
        ({"OTEL_SDK_DISABLED": "1"}, True),
        ({"OTEL_SDK_DISABLED": "yes"}, True),
        ({"OTEL_SDK_DISABLED": ""}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_the_standard_variables_turn_tracing_off_even_with_an_endpoint(
    env: pytest.MonkeyPatch, variables: dict[str, str], exported: bool
) -> None:
    assert settings(env, **ENDPOINT, **variables).traces_exported is exported


def test_turning_the_exporter_on_without_an_endpoint_exports_nothing(
    env: pytest.MonkeyPatch,
) -> None:
    assert not settings(env, OTEL_TRACES_EXPORTER="otlp").traces_exported


def test_an_exporter_we_do_not_have_is_refused_by_name(env: pytest.MonkeyPatch) -> None:
    error = rejected(env, **ENDPOINT, OTEL_TRACES_EXPORTER="otlp,zipkin")

    assert describe_settings_error(error) == [
        "OTEL_TRACES_EXPORTER: zipkin: the exporters supported are otlp and none"
    ]


@pytest.mark.parametrize("variable", ["GATEWAY_METRICS_ADDRESS", "WORKER_METRICS_ADDRESS"])
def test_a_metrics_address_must_be_host_and_port(env: pytest.MonkeyPatch, variable: str) -> None:
    error = rejected(env, **{variable: "9464"})

    assert variable in str(error).upper()


def test_gateway_processes_need_a_fixed_metrics_port(env: pytest.MonkeyPatch) -> None:
    error = rejected(
        env,
        GATEWAY_PROCESSES="2",
        GATEWAY_ADDRESS="127.0.0.1:50051",
        GATEWAY_METRICS_ADDRESS="127.0.0.1:0",
    )

    assert "GATEWAY_PROCESSES above 1 needs a fixed port in GATEWAY_METRICS_ADDRESS" in str(error)


def test_log_format_is_text_or_json(env: pytest.MonkeyPatch) -> None:
    assert settings(env, LOG_FORMAT="json").log_format == "json"
    assert "LOG_FORMAT" in str(rejected(env, LOG_FORMAT="yaml")).upper()


@pytest.mark.parametrize(
    ("dependency", "publish", "accepted"),
    [("1", "3", True), ("1.5", "3", True), ("1.6", "3", False), ("2", "3", False)],
)
def test_dependency_timeout_must_fit_twice_in_the_publish_bound(
    env: pytest.MonkeyPatch, dependency: str, publish: str, accepted: bool
) -> None:
    variables = {"DEPENDENCY_TIMEOUT_SECONDS": dependency, "PUBLISH_TIMEOUT_SECONDS": publish}
    if accepted:
        assert settings(env, **variables).dependency_timeout_seconds == float(dependency)
    else:
        assert "DEPENDENCY_TIMEOUT_SECONDS must be at most half" in str(rejected(env, **variables))
