"""The one token format: page tokens (ListProjects, later ListTasks) and WatchProjects cursors.

A token is base64url(JSON body + HMAC-SHA256 tag). The body names its kind and the deployment
that made it (one database, one deployment); the tag makes it tamper-evident. It is opaque to
callers by contract, not by secrecy: nothing in it is private to the caller who holds it.

The key is TOKEN_SIGNING_KEY when set, else the key stored in the database's `feed` row, which
every gateway of a deployment shares and which outlives restarts: a cursor saved today resumes
next week, from any gateway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

TAG_BYTES = 16


class TokenError(ValueError):
    """A token that cannot be used, and why (for the caller's INVALID_ARGUMENT)."""


class TokenSigner:
    """Seals and opens the tokens of one deployment.

    Made without a key when the key is the database's, which may answer only after the gateway
    has started serving: `bind` gives it the key then (no call reaches a handler before, see
    `gateway.startup`).
    """

    def __init__(self, key: bytes | None = None, deployment: str = "") -> None:
        self._key = key
        self.deployment = deployment

    def bind(self, key: bytes, deployment: str) -> None:
        self._key = key
        self.deployment = deployment

    def _tag(self, body: bytes) -> bytes:
        if self._key is None:
            raise RuntimeError("TokenSigner used before bind: the gateway has not started")
        return hmac.new(self._key, body, hashlib.sha256).digest()[:TAG_BYTES]

    def seal(self, kind: str, payload: dict[str, Any]) -> str:
        body = json.dumps(
            {"k": kind, "d": self.deployment, "p": payload}, separators=(",", ":")
        ).encode()
        return base64.urlsafe_b64encode(body + self._tag(body)).rstrip(b"=").decode()

    def open(self, kind: str, token: str) -> dict[str, Any]:
        """The payload of a token of `kind` made by this deployment; TokenError says why not."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
            sealed = json.loads(body)
            made_for, deployment, payload = sealed["k"], sealed["d"], sealed["p"]
        except (binascii.Error, ValueError, KeyError, TypeError) as exc:
            raise TokenError("is garbled: pass it back exactly as the service gave it") from exc
        if made_for != kind or not isinstance(payload, dict):
            raise TokenError(f"is not a {kind}")
        if deployment != self.deployment:
            raise TokenError(
                f"was made by another deployment ({deployment}), not this one "
                f"({self.deployment}): start again without it"
            )
        if not hmac.compare_digest(tag, self._tag(body)):
            raise TokenError("was altered or forged: pass it back exactly as the service gave it")
        return payload
