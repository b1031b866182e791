"""Every setting of the gateway and the worker, read once from the environment (and `.env`).

Nothing else in the project reads `os.environ`: processes call `get_settings()` and pass the
result (or the parts they need) down. Validators fail fast and name the variable that is wrong.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import secrets
import sys
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from core.db import MAX_CLIENT_LENGTH  # the width of tasks.client

DEFAULT_GATEWAY_ADDRESS = "127.0.0.1:50051"
DEFAULT_SAMPLE_SITE_ADDRESS = "127.0.0.1:8081"
DEFAULT_DATA_DIR = Path("data")
# Name, version and a contact, as RFC 9110 and robots.txt etiquette ask; put a real contact in
# SOURCE_USER_AGENT when harvesting someone else's site.
DEFAULT_USER_AGENT = (
    f"projects-harvester/{importlib.metadata.version('projects-harvester')} "
    "(+https://example.invalid/contact)"
)


# OTEL_TRACES_EXPORTER's values that we honour (the specification's names).
OTLP_EXPORTER = "otlp"
NO_EXPORTER = "none"


def _exporter_names(value: str) -> list[str]:
    """OTEL_TRACES_EXPORTER as its list of names (empty: the default, otlp)."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    return names or [OTLP_EXPORTER]


# The parsers a worker can read pages with (worker/parse.py); both give the same items.
SourceParser = Literal["beautifulsoup", "lxml"]


class SourceProfile(BaseModel):
    """CSS selectors that say where a listing page keeps each field of a project."""

    item: str = Field(
        default=".project",
        description="CSS selector of one project on a listing page: each element it matches is one "
        "item, and the selectors below are looked up inside it.",
    )
    active_class: str = Field(
        default="is-active",
        description="Class name that marks an item as an active project; an item without it is "
        "stored as inactive.",
    )
    title: str = Field(
        default=".project-title",
        description="CSS selector of the title inside an item; its text is taken with whitespace "
        "collapsed, and an item without a title is skipped.",
    )
    link: str = Field(
        default=".project-title a",
        description="CSS selector of the link inside an item; its `href`, resolved against the "
        "page's URL, is the project's identity, and an item without an http(s) link is "
        "skipped.",
    )
    description: str = Field(
        default=".project-description",
        description="CSS selector of the description inside an item (its text, whitespace "
        "collapsed; empty when missing).",
    )
    start: str = Field(
        default="time.project-start",
        description="CSS selector of the start date inside an item: its `datetime` attribute as "
        "an ISO date, else its text in `SOURCE_PROFILE__START_TEXT_FORMAT`, else no date.",
    )
    start_text_format: str = Field(
        default="%d.%m.%Y",
        description="strptime format of a start date given as text, e.g. `%d.%m.%Y` for "
        "31.12.2026.",
    )


class ApiToken(BaseModel):
    """A client's name and the bearer token it presents."""

    name: str
    token: str


def _parse_tokens(raw: str) -> list[ApiToken]:
    tokens: list[ApiToken] = []
    for number, pair in enumerate(filter(None, (part.strip() for part in raw.split(","))), 1):
        name, sep, token = pair.partition(":")
        # Named by position: the entry itself may be a token.
        if not sep or not name.strip() or not token.strip():
            raise ValueError(f"API_TOKENS entry #{number} must look like name:token")
        if len(name.strip()) > MAX_CLIENT_LENGTH:
            raise ValueError(
                f"API_TOKENS entry #{number}: the name is longer than {MAX_CLIENT_LENGTH}"
            )
        tokens.append(ApiToken(name=name.strip(), token=token.strip()))
    names = [t.name for t in tokens]
    if len(names) != len(set(names)):
        raise ValueError("API_TOKENS names must be unique")
    return tokens


class Settings(BaseSettings):
    """The whole configuration; see the settings table in the README."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
        # A bad API_TOKENS entry must not print the good ones into a log.
        hide_input_in_errors=True,
    )

    # --- gateway ---
    gateway_address: str = Field(
        default=DEFAULT_GATEWAY_ADDRESS,
        description="host:port the gateway listens on; localhost only unless you set e.g. "
        "`0.0.0.0:50051`.",
    )
    api_tokens: Annotated[list[ApiToken], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens of the gateway's clients, as `name:token,name2:token2`; the "
        "name is the client's identity (a client sees only its own tasks). Unset: the gateway "
        "makes up one token for client `default` and prints it once.",
    )
    max_page: int = Field(default=10_000, ge=1, description="Highest page number Upload accepts.")
    max_batch_pages: int = Field(
        default=1000, ge=1, description="Most pages one UploadPages batch may ask for."
    )
    until_known_window: int = Field(
        default=4,
        ge=1,
        description="How many pages an until_known batch runs ahead of its lowest unfinished "
        "page: more is faster on a slow site, and fetches more pages past the stopping one.",
    )
    gateway_max_message_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="Largest request the gateway accepts, in bytes; a larger one is "
        "RESOURCE_EXHAUSTED.",
    )
    gateway_max_concurrent_rpcs: int = Field(
        default=512,
        ge=1,
        description="Calls one gateway process keeps in flight; past it new calls are "
        "RESOURCE_EXHAUSTED.",
    )
    gateway_grace_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a gateway told to stop (SIGTERM, Ctrl-C) lets calls in flight "
        "finish.",
    )
    gateway_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Gateway processes `python -m gateway` runs on `GATEWAY_ADDRESS` (they share "
        "the port with SO_REUSEPORT). One process uses one core: on a host of its own, set it "
        "to the host's cores. Above 1 it needs a fixed port.",
    )
    gateway_reuse_port: bool = Field(
        default=False,
        description="Listen with SO_REUSEPORT, so gateways you start yourself can share one "
        "port (`GATEWAY_PROCESSES` sets it for its own processes).",
    )
    gateway_rate_limit_per_second: float = Field(
        default=0.0,
        ge=0,
        description="Calls per second each client may make, per gateway process; past it the "
        "gateway answers RESOURCE_EXHAUSTED with a RetryInfo. `0` turns the limit off.",
    )
    gateway_rate_limit_burst: int = Field(
        default=100,
        ge=1,
        description="Calls a client may make at once before `GATEWAY_RATE_LIMIT_PER_SECOND` "
        "applies.",
    )
    gateway_tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain of the gateway; set with `GATEWAY_TLS_KEY_FILE`, the "
        "gateway serves TLS only. Unset: plaintext.",
    )
    gateway_tls_key_file: Path | None = Field(
        default=None,
        description="PEM private key of `GATEWAY_TLS_CERT_FILE`; the two go together.",
    )
    gateway_tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA certificate; when set, clients must present a certificate it "
        "signed (mutual TLS). Needs `GATEWAY_TLS_CERT_FILE`.",
    )
    reconcile_after_seconds: float = Field(
        default=900.0,
        ge=0,
        description="A task never started, no longer queued and enqueued longer ago than this "
        'is marked FAILURE "lost by the broker" (a Redis that lost its data) instead of '
        "staying PENDING. `0` turns the check off.",
    )
    reconcile_interval_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How often the gateway looks for tasks the broker lost.",
    )
    publish_timeout_seconds: float = Field(
        default=3.0,
        gt=0,
        description="Longest the gateway tries to hand one Upload's task to the broker, "
        "retries included, before answering UNAVAILABLE.",
    )
    broker_check_interval_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often the gateway's health service re-checks the broker and the database; "
        "a check that gets no answer within this (or `DEPENDENCY_TIMEOUT_SECONDS`, the shorter) "
        "counts as down.",
    )
    dependency_timeout_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Longest the gateway waits on each step of a call to Redis or the database "
        "(connecting, one command or statement, a free pooled connection), and the bound of the "
        "worker's database connects and (2 s at least) of its calls to the fleet's politeness "
        "budget in Redis, and of a watch event's publish (an event that cannot be published "
        "within it is dropped; watchers catch up by timer): a dependency slower than this "
        "counts as down, and the call answers "
        "UNAVAILABLE. At most half of `PUBLISH_TIMEOUT_SECONDS`.",
    )
    token_signing_key: str | None = Field(
        default=None,
        min_length=32,
        description="The key (32 characters or more) that signs ListProjects page tokens and "
        "WatchProjects cursors. Unset: a key made once and kept in the database, which every "
        "gateway of the deployment shares and which survives restarts; set it only to rotate "
        "it (tokens signed with the old key are then refused).",
    )
    watch_max_streams_per_client: int = Field(
        default=100,
        ge=1,
        description="Open WatchProjects streams one client may hold on one gateway process; "
        "past it, RESOURCE_EXHAUSTED.",
    )
    watch_buffer_changes: int = Field(
        default=1000,
        ge=1,
        description="Changes a WatchProjects stream may fall behind the gateway's feed before it "
        "is served from the database at its own pace instead.",
    )
    watch_poll_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often the gateway reads new project changes when no event from a "
        "worker woke it: the longest a change can wait when events are lost.",
    )
    gateway_keepalive_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often the gateway pings a connection that is quiet (HTTP/2 "
        "keepalive), so that idle WatchProjects streams survive proxies and dead peers are "
        "noticed.",
    )

    # --- broker, results ---
    celery_broker_url: str | None = Field(
        default=None,
        description="Broker URL, e.g. `redis://host:6379/0`, `amqp://user:pass@host//` or "
        "`redis+socket:///path`. Unset: a Redis embedded in `DATA_DIR`, started on demand "
        "(one machine only).",
    )
    celery_result_backend: str | None = Field(
        default=None,
        description="Result store URL (`redis://...`). Unset: the broker's URL; it must be set "
        "when the broker is AMQP.",
    )
    result_expires_seconds: int = Field(
        default=86_400,
        ge=1,
        description="How long task results and the gateway's task records are kept; after "
        "it GetStatus answers NOT_FOUND.",
    )
    broker_visibility_timeout_seconds: int = Field(
        default=600,
        ge=1,
        description="Redis broker: a task taken but not acknowledged this long is delivered "
        "again. It must exceed `TASK_TIME_LIMIT_SECONDS` plus the longer of "
        "`RETRY_AFTER_CAP_SECONDS` and `RETRY_MAX_DELAY_SECONDS`.",
    )
    task_queue: str = Field(
        default="harvest",
        description="Name of the queue the gateway publishes to and the workers consume; give "
        "both the same.",
    )
    redis_key_prefix: str = Field(
        default="",
        description="Prefix of every Redis key of the broker and the result store, so several "
        "deployments can share one Redis. Unset: no prefix.",
    )

    # --- worker ---
    source_url: str = Field(
        default="",
        description="URL template of a listing page, with `{page}` where the page number "
        "goes, e.g. `https://example.org/projects?page={page}`. Unset: the bundled sample "
        "site, `http://SAMPLE_SITE_ADDRESS/projects?page={page}`.",
    )
    source_profile: SourceProfile = Field(
        default_factory=SourceProfile,
        description="How the worker reads a listing page: the CSS selectors below, each set "
        "by its own `SOURCE_PROFILE__<NAME>` variable, or several at once as a JSON object in "
        '`SOURCE_PROFILE`, e.g. `{"item": ".card"}`.',
    )
    source_parser: SourceParser = Field(
        default="beautifulsoup",
        description="Which parser reads a listing page by `SOURCE_PROFILE`'s selectors: "
        "`beautifulsoup` (BeautifulSoup on lxml, selectors by soupsieve) or `lxml` (lxml's own "
        "tree, selectors translated to XPath by cssselect: the same items for less CPU, see "
        "bench/README.md). With `lxml` a worker does not start, and says which selector, when "
        "cssselect cannot translate one or it uses a feature that may match otherwise than in "
        "soupsieve (`:hover`, `:empty`, `[type=…]`, namespaces and the like).",
    )
    worker_concurrency: int = Field(
        default=32,
        ge=1,
        description="Tasks in flight per worker process (threads sharing its one event loop); "
        "`celery worker --concurrency` overrides it. 32 is the best the benchmark found "
        "(bench/README.md); tune it to your source's latency and your cores.",
    )
    worker_db_connections: int = Field(
        default=8,
        ge=1,
        description="Database connections per worker process, which its tasks take turns on "
        "to store their pages; keep worker processes x (this + WORKER_RECORD_CONNECTIONS), "
        "plus 20 per gateway process, below the database's max_connections.",
    )
    worker_record_connections: int = Field(
        default=4,
        ge=1,
        description="Database connections per worker process for its tasks' own records "
        "(started, retrying, ended): kept apart so that a task's state reaches its watchers "
        "without waiting behind other pages' stores.",
    )
    fetch_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Deadline of one whole fetch of a page, redirects and body included; "
        "past it the try is retried.",
    )
    fetch_max_bytes: int = Field(
        default=5 * 1024 * 1024,
        ge=1024,
        description="Largest page body the worker reads, in bytes counted after "
        "decompression; a larger page fails its task.",
    )
    fetch_max_redirects: int = Field(
        default=5,
        ge=0,
        description="Redirects a fetch follows, only ever to the source's own host; a "
        "redirect elsewhere fails the task.",
    )
    # --- politeness to the source (worker/politeness.py) ---
    source_max_requests_per_second: float = Field(
        default=5.0,
        gt=0,
        description="Requests the whole fleet of workers sends to one source host in any second "
        "(of a fractional rate above one, its whole part; below one, one request in each "
        "1 / rate seconds), robots.txt included, kept through Redis (the broker's, or the "
        "result backend's when the broker is AMQP); a robots.txt Crawl-delay can only slow it "
        "further.",
    )
    source_max_concurrency: int = Field(
        default=8,
        ge=1,
        description="Requests the whole fleet has in flight at once on one source host.",
    )
    source_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a worker holds one of the host's `SOURCE_MAX_CONCURRENCY` slots "
        "at most: a worker that dies holding one lowers the fleet's concurrency for this long. "
        "It must exceed `FETCH_TIMEOUT_SECONDS`.",
    )
    source_obey_robots: bool = Field(
        default=True,
        description="Read the source's robots.txt and obey it: a page it disallows fails "
        "without being fetched, and its Crawl-delay slows the rate.",
    )
    robots_ttl_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="How long the fleet keeps a host's robots.txt (in Redis) before one worker "
        "fetches it again; a robots.txt that could not be read (5xx, unreachable) is tried "
        "again after a tenth of this, at most 5 minutes.",
    )
    source_user_agent: str = Field(
        default=DEFAULT_USER_AGENT,
        min_length=1,
        description="User-Agent of every request to the source, robots.txt included, and the "
        "name matched against robots.txt's User-agent lines (the part before the first `/`).",
    )
    retry_max_tries: int = Field(
        default=4,
        ge=1,
        description="Tries per task (5xx, 429, timeouts, connection errors) before it is FAILURE.",
    )
    retry_base_delay_seconds: float = Field(
        default=1.0,
        ge=0,
        le=2.0,
        description="First step of the exponential backoff between tries (at most 2); each "
        "next step doubles, with jitter.",
    )
    retry_max_delay_seconds: float = Field(
        default=30.0, ge=0, description="Longest step of the backoff between tries."
    )
    retry_after_cap_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Longest `Retry-After` of a 429 or 503 the worker honours; a longer one is "
        "cut to this.",
    )
    task_soft_time_limit_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A try of a task running longer than this is stopped and retried; it "
        "must be below `TASK_TIME_LIMIT_SECONDS`.",
    )
    task_time_limit_seconds: float = Field(
        default=150.0,
        gt=0,
        description="Hard time limit of a try, enforced by Celery in prefork pools only (the "
        "worker's threads pool relies on the soft limit); it bounds "
        "`BROKER_VISIBILITY_TIMEOUT_SECONDS` from below.",
    )
    upsert_batch_size: int = Field(
        default=500,
        ge=1,
        le=3000,
        description="Projects stored per upsert statement (and per database round trip); at "
        "most 3000: SQLAlchemy splits a larger batch into several statements to keep within "
        "its bound of parameters a statement.",
    )
    failpoints: str = Field(
        default="",
        description="Test-only fault injection, e.g. `after_store=pause@3` (see "
        "worker/failpoints.py); leave it unset in production.",
    )

    # --- storage ---
    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        description="Directory of the default SQLite database and of the embedded Redis "
        "(socket, AOF, logs), relative to the working directory unless absolute.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL of the database, e.g. "
        "`postgresql+asyncpg://user:pass@host/db`. Unset: SQLite at `DATA_DIR/projects.db`.",
    )

    # --- sample site (make run) ---
    sample_site_address: str = Field(
        default=DEFAULT_SAMPLE_SITE_ADDRESS,
        description="host:port the bundled sample site listens on (`make run`, "
        "`python -m sample_site`).",
    )

    log_level: str = Field(
        default="INFO",
        description="Log level of the gateway: DEBUG, INFO, WARNING, ERROR or CRITICAL (the "
        "worker takes `celery worker --loglevel`).",
    )

    # --- observability ---
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="How gateway and worker write their logs: `text`, one readable line per "
        "record, or `json`, one JSON object per line (time, level, logger, message, and the task "
        "id, page and trace id where there is one), for a log collector.",
    )
    gateway_metrics_address: str | None = Field(
        default=None,
        description="host:port where the gateway serves Prometheus metrics (`/metrics`). With "
        "`GATEWAY_PROCESSES` above 1, process *i* (from 0) serves on port + *i*: one port per "
        "process, which Prometheus scrapes and `sum()` adds up. Unset: no metrics.",
    )
    worker_metrics_address: str | None = Field(
        default=None,
        description="host:port where a worker process serves Prometheus metrics (`/metrics`); "
        "each worker process on a host needs a port of its own (one scrape target per "
        "process, added up by `sum()`). Unset: no metrics.",
    )
    task_events: bool = Field(
        default=True,
        description="Celery task events (sent by the gateway; received, started, succeeded, "
        "failed, retried by the workers), which `celery -A worker.app events`, Flower and other "
        "monitors show. `false` saves a broker message per task state.",
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        description="OpenTelemetry's standard variable: set, gateway and worker export traces "
        "over OTLP/HTTP to it (`/v1/traces` is added), one trace from the Upload to the rows "
        "stored. The SDK reads the other `OTEL_*` variables itself (`OTEL_TRACES_SAMPLER`, "
        "`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`, ...). Unset: no tracing, at no cost.",
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None,
        description="OpenTelemetry's standard variable: the full URL traces are exported to, "
        "instead of `OTEL_EXPORTER_OTLP_ENDPOINT`; set, it turns tracing on too.",
    )
    otel_traces_exporter: str = Field(
        default=OTLP_EXPORTER,
        description="OpenTelemetry's standard variable: which exporters traces go to, "
        "comma-separated. `otlp` (the default) exports to the endpoint above; `none` exports "
        "nothing and turns tracing off even with an endpoint set. Others (console, zipkin) "
        "are not supported.",
    )
    otel_sdk_disabled: bool = Field(
        default=False,
        description="OpenTelemetry's standard variable: `true` (in any case; no other value) "
        "turns tracing off even with an endpoint set; anything else leaves it as configured.",
    )

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        return _parse_tokens(value) if isinstance(value, str) else value

    @field_validator("otel_traces_exporter")
    @classmethod
    def _check_traces_exporter(cls, value: str) -> str:
        names = _exporter_names(value)
        unknown = sorted(set(names) - {OTLP_EXPORTER, NO_EXPORTER})
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: the exporters supported are {OTLP_EXPORTER} and "
                f"{NO_EXPORTER}"
            )
        return value

    @field_validator("otel_sdk_disabled", mode="before")
    @classmethod
    def _spec_boolean(cls, value: object) -> object:
        # The specification's booleans: true is the string "true" in any case, and nothing
        # else ("1", "yes", a typo) is; an SDK must not widen that, as pydantic's bool would.
        return value.strip().lower() == "true" if isinstance(value, str) else value

    @field_validator("source_url")
    @classmethod
    def _check_source_url(cls, value: str) -> str:
        if value and ("{page}" not in value or not value.startswith(("http://", "https://"))):
            raise ValueError("SOURCE_URL must be an http(s) URL template containing {page}")
        return value

    @field_validator(
        "gateway_address",
        "sample_site_address",
        "gateway_metrics_address",
        "worker_metrics_address",
    )
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{value!r} must look like host:port")
        return value

    @model_validator(mode="after")
    def _default_source(self) -> Self:
        if not self.source_url:
            self.source_url = self._sample_site_url
        return self

    @property
    def _sample_site_url(self) -> str:
        return f"http://{self.sample_site_address}/projects?page={{page}}"

    @property
    def source_is_sample_site(self) -> bool:
        return self.source_url == self._sample_site_url

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()

    @model_validator(mode="after")
    def _check_time_limits(self) -> Self:
        if self.task_soft_time_limit_seconds >= self.task_time_limit_seconds:
            raise ValueError("TASK_SOFT_TIME_LIMIT_SECONDS must be below TASK_TIME_LIMIT_SECONDS")
        longest_wait = max(self.retry_after_cap_seconds, self.retry_max_delay_seconds)
        longest_hold = self.task_time_limit_seconds + longest_wait
        if self.broker_visibility_timeout_seconds <= longest_hold:
            # A message is redelivered to another worker once it is unacked this long, so a
            # timeout below the longest task would run tasks twice while the first still runs.
            raise ValueError(
                "BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed TASK_TIME_LIMIT_SECONDS plus the "
                f"longer of RETRY_AFTER_CAP_SECONDS and RETRY_MAX_DELAY_SECONDS ({longest_hold:g})"
            )
        if 2 * self.dependency_timeout_seconds > self.publish_timeout_seconds:
            # A stalled database can cost a call two steps (the pooled connection's ping, then
            # a reconnect): both must fit in the bound every call promises.
            raise ValueError(
                "DEPENDENCY_TIMEOUT_SECONDS must be at most half of PUBLISH_TIMEOUT_SECONDS "
                f"({self.publish_timeout_seconds / 2:g})"
            )
        if self.source_lease_seconds <= self.fetch_timeout_seconds:
            # A slot that expires while its fetch still runs lets one more request in at once.
            raise ValueError("SOURCE_LEASE_SECONDS must exceed FETCH_TIMEOUT_SECONDS")
        if (self.gateway_tls_cert_file is None) != (self.gateway_tls_key_file is None):
            raise ValueError("GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE go together")
        if self.gateway_tls_client_ca_file is not None and self.gateway_tls_cert_file is None:
            raise ValueError("GATEWAY_TLS_CLIENT_CA_FILE needs GATEWAY_TLS_CERT_FILE and _KEY_FILE")
        if self.gateway_processes > 1 and self.gateway_address.endswith(":0"):
            # Each process would be given a port of its own by the system.
            raise ValueError("GATEWAY_PROCESSES above 1 needs a fixed port in GATEWAY_ADDRESS")
        if (
            self.gateway_processes > 1
            and self.gateway_metrics_address is not None
            and self.gateway_metrics_address.endswith(":0")
        ):
            # Port + i for process i: a system-chosen port would leave Prometheus guessing.
            raise ValueError(
                "GATEWAY_PROCESSES above 1 needs a fixed port in GATEWAY_METRICS_ADDRESS"
            )
        if self.celery_result_backend is None and (self.celery_broker_url or "").startswith(
            ("amqp", "pyamqp")
        ):
            raise ValueError(
                "CELERY_RESULT_BACKEND must be set (a redis:// URL) when CELERY_BROKER_URL is AMQP"
            )
        return self

    @property
    def traces_exported(self) -> bool:
        """Whether traces are to be exported over OTLP: an endpoint set (the SDK reads it
        itself), and neither `OTEL_TRACES_EXPORTER=none` nor `OTEL_SDK_DISABLED=true`."""
        endpoint = self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint
        return (
            bool(endpoint)
            and not self.otel_sdk_disabled
            and OTLP_EXPORTER in _exporter_names(self.otel_traces_exporter)
        )

    @property
    def sqlite_default_url(self) -> str:
        return f"sqlite+aiosqlite:///{(self.data_dir / 'projects.db').resolve()}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or self.sqlite_default_url

    def page_url(self, page: int) -> str:
        return self.source_url.replace("{page}", str(page))


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()


def describe_settings_error(error: ValidationError | SettingsError) -> list[str]:
    """One line per bad setting: the variable as the environment spells it, and what it expects.

    Without pydantic's boilerplate and without the value given (it may be a token).
    """
    if isinstance(error, SettingsError):
        # pydantic-settings could not decode a JSON value: 'error parsing value for field "x"'.
        field = re.search(r'field "(\w+)"', str(error))
        variable = field.group(1).upper() if field else "a setting"
        cause = error.__cause__
        if isinstance(cause, json.JSONDecodeError):
            return [f"{variable}: must be JSON ({cause.msg} at character {cause.pos})"]
        return [f"{variable}: cannot be read{f' ({cause})' if cause else ''}"]
    lines = []
    for problem in error.errors(include_url=False, include_input=False, include_context=False):
        variable = "__".join(str(part) for part in problem["loc"]).upper()
        message = problem["msg"].removeprefix("Value error, ")
        message = re.sub(r"^Input should", "should", message)
        if not variable:  # a check across settings: its message names them
            lines.append(message)
        elif message.startswith(f"{variable} "):
            lines.append(f"{variable}: {message.removeprefix(variable).lstrip()}")
        else:
            lines.append(f"{variable}: {message}")
    return lines


def settings_or_exit() -> Settings:
    """`get_settings()`, or each bad setting on a line of its own on stderr and exit status 2."""
    try:
        return get_settings()
    except (ValidationError, SettingsError) as error:
        for line in describe_settings_error(error):
            print(line, file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(2) from None


def generate_token() -> str:
    return secrets.token_urlsafe(24)
