"""Every setting of the gateway and the worker, read once from the environment (and `.env`).

Nothing else in the project reads `os.environ`: processes call `get_settings()` and pass the
result (or the parts they need) down. Validators fail fast and name the variable that is wrong.
"""

from __future__ import annotations

import functools
import secrets
from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_GATEWAY_ADDRESS = "127.0.0.1:50051"
DEFAULT_SAMPLE_SITE_ADDRESS = "127.0.0.1:8081"
DEFAULT_DATA_DIR = Path("data")
MAX_CLIENT_NAME_LENGTH = 64  # the width of tasks.client


class SourceProfile(BaseModel):
    """CSS selectors that say where a listing page keeps each field of a project."""

    item: str = ".project"
    active_class: str = "is-active"
    title: str = ".project-title"
    link: str = ".project-title a"
    description: str = ".project-description"
    start: str = "time.project-start"
    start_text_format: str = "%d.%m.%Y"


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
        if len(name.strip()) > MAX_CLIENT_NAME_LENGTH:
            raise ValueError(
                f"API_TOKENS entry #{number}: the name is longer than {MAX_CLIENT_NAME_LENGTH}"
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
    gateway_address: str = DEFAULT_GATEWAY_ADDRESS
    api_tokens: Annotated[list[ApiToken], NoDecode] = Field(default_factory=list)
    max_page: int = Field(default=10_000, ge=1)
    gateway_max_message_bytes: int = Field(default=16 * 1024, ge=1024)
    gateway_max_concurrent_rpcs: int = Field(default=512, ge=1)
    gateway_grace_seconds: float = Field(default=5.0, ge=0)
    # One gateway process serves from one core (the GIL); more share the port (SO_REUSEPORT).
    gateway_processes: int = Field(default=1, ge=1, le=64)
    gateway_reuse_port: bool = False
    # Per client and per gateway process; 0 turns the limit off.
    gateway_rate_limit_per_second: float = Field(default=0.0, ge=0)
    gateway_rate_limit_burst: int = Field(default=100, ge=1)
    # TLS: a certificate and key turn it on; a client CA also requires client certificates.
    gateway_tls_cert_file: Path | None = None
    gateway_tls_key_file: Path | None = None
    gateway_tls_client_ca_file: Path | None = None
    # Tasks never started, no longer queued, and enqueued longer ago than this are FAILURE
    # "lost by the broker" (a Redis that lost its data); 0 turns the check off.
    reconcile_after_seconds: float = Field(default=900.0, ge=0)
    reconcile_interval_seconds: float = Field(default=60.0, gt=0)
    publish_timeout_seconds: float = Field(default=3.0, gt=0)
    broker_check_interval_seconds: float = Field(default=2.0, gt=0)

    # --- broker, results ---
    celery_broker_url: str | None = None
    celery_result_backend: str | None = None
    result_expires_seconds: int = Field(default=86_400, ge=1)
    broker_visibility_timeout_seconds: int = Field(default=600, ge=1)
    task_queue: str = "harvest"
    # Prefix for every Redis key of the broker and the result backend (several apps, one Redis).
    redis_key_prefix: str = ""

    # --- worker ---
    # Unset: the bundled sample site at SAMPLE_SITE_ADDRESS.
    source_url: str = ""
    source_profile: SourceProfile = Field(default_factory=SourceProfile)
    worker_concurrency: int = Field(default=16, ge=1)
    worker_db_connections: int = Field(default=8, ge=1)
    fetch_timeout_seconds: float = Field(default=10.0, gt=0)
    fetch_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    fetch_max_redirects: int = Field(default=5, ge=0)
    retry_max_tries: int = Field(default=4, ge=1)
    retry_base_delay_seconds: float = Field(default=1.0, ge=0, le=2.0)
    retry_max_delay_seconds: float = Field(default=30.0, ge=0)
    retry_after_cap_seconds: float = Field(default=60.0, ge=0)
    task_soft_time_limit_seconds: float = Field(default=120.0, gt=0)
    task_time_limit_seconds: float = Field(default=150.0, gt=0)
    upsert_batch_size: int = Field(default=500, ge=1, le=4000)
    # Test-only fault injection, e.g. "after_store=pause@3" (see worker/failpoints.py).
    failpoints: str = ""

    # --- storage ---
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None

    # --- sample site (make run) ---
    sample_site_address: str = DEFAULT_SAMPLE_SITE_ADDRESS

    log_level: str = "INFO"

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        return _parse_tokens(value) if isinstance(value, str) else value

    @field_validator("source_url")
    @classmethod
    def _check_source_url(cls, value: str) -> str:
        if value and ("{page}" not in value or not value.startswith(("http://", "https://"))):
            raise ValueError("SOURCE_URL must be an http(s) URL template containing {page}")
        return value

    @field_validator("gateway_address", "sample_site_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
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
        if (self.gateway_tls_cert_file is None) != (self.gateway_tls_key_file is None):
            raise ValueError("GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE go together")
        if self.gateway_tls_client_ca_file is not None and self.gateway_tls_cert_file is None:
            raise ValueError("GATEWAY_TLS_CLIENT_CA_FILE needs GATEWAY_TLS_CERT_FILE and _KEY_FILE")
        if self.gateway_processes > 1 and self.gateway_address.endswith(":0"):
            # Each process would be given a port of its own by the system.
            raise ValueError("GATEWAY_PROCESSES above 1 needs a fixed port in GATEWAY_ADDRESS")
        if self.celery_result_backend is None and (self.celery_broker_url or "").startswith(
            ("amqp", "pyamqp")
        ):
            raise ValueError(
                "CELERY_RESULT_BACKEND must be set (a redis:// URL) when CELERY_BROKER_URL is AMQP"
            )
        return self

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


def generate_token() -> str:
    return secrets.token_urlsafe(24)
