"""Where the gateway is and how to reach it: address, token, TLS and the default deadline.

Read from arguments, else from the environment (`Connection.from_env`), in one place, for the
client and the `harvester` command alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV_ADDRESS = "HARVESTER_ADDRESS"
ENV_TOKEN = "HARVESTER_TOKEN"  # noqa: S105 - the variable's name, not a token
ENV_TLS_CA_FILE = "HARVESTER_TLS_CA_FILE"
ENV_TLS_CERT_FILE = "HARVESTER_TLS_CERT_FILE"
ENV_TLS_KEY_FILE = "HARVESTER_TLS_KEY_FILE"
ENV_DEADLINE = "HARVESTER_DEADLINE_SECONDS"

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Every unary call gets this deadline unless told otherwise: a gateway that does not answer
# costs a caller seconds, never a hung thread.
DEFAULT_DEADLINE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Connection:
    """How to reach one gateway. TLS when `tls_ca_file` is set (with a client certificate
    too when `tls_cert_file` and `tls_key_file` are); plaintext otherwise."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    deadline: float = DEFAULT_DEADLINE_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Connection:
        env = os.environ if environ is None else environ

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        deadline = env.get(ENV_DEADLINE)
        return cls(
            address=env.get(ENV_ADDRESS) or DEFAULT_ADDRESS,
            token=env.get(ENV_TOKEN) or None,
            tls_ca_file=path(ENV_TLS_CA_FILE),
            tls_cert_file=path(ENV_TLS_CERT_FILE),
            tls_key_file=path(ENV_TLS_KEY_FILE),
            deadline=float(deadline) if deadline else DEFAULT_DEADLINE_SECONDS,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext."""
        if self.tls_ca_file is None:
            return None
        key = self.tls_key_file.read_bytes() if self.tls_key_file else None
        chain = self.tls_cert_file.read_bytes() if self.tls_cert_file else None
        return grpc.ssl_channel_credentials(self.tls_ca_file.read_bytes(), key, chain)
