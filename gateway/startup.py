"""The gateway's start-up, whatever is down: serve at once, and do what needs the database once
it answers.

A gateway started before its database (or while it is down) opens its port anyway. Until the
schema is migrated, the deployment's key read and the project feed primed (`Startup.run`,
tried again with backoff and logged once a minute, see `core.waiting`), health says
NOT_SERVING and `StartingGate` answers every call but health's and reflection's UNAVAILABLE
with a RetryInfo, saying what the gateway waits for; no handler runs before. Then the gate
opens and the gateway carries on by itself, with no restart.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from core.db import is_unreachable
from core.waiting import DEFAULT_BACKOFF, Backoff, until_done
from gateway.auth import OPEN_SERVICES, refusal
from gateway.errors import Unavailable
from gateway.handlers import Handler, Interceptor, service_of

log = logging.getLogger(__name__)

STARTING_RETRY_SECONDS = 1.0


def _may_pass(exc: BaseException) -> bool:
    return is_unreachable(exc) or isinstance(exc, Unavailable)


class Startup:
    def __init__(
        self, prepare: Callable[[], Awaitable[None]], backoff: Backoff = DEFAULT_BACKOFF
    ) -> None:
        self._prepare = prepare
        self._backoff = backoff
        self.ready = False
        self.waiting_for = "the database has not been tried yet"

    def _note(self, exc: BaseException) -> None:
        # The kind of failure only: its text may name internal hosts (the log has it whole).
        self.waiting_for = f"last try: {type(exc).__name__}"

    async def run(self) -> None:
        """Prepare once the database answers; raises what waiting will not cure."""
        await until_done(
            self._prepare, "the database", _may_pass, backoff=self._backoff, on_failure=self._note
        )
        self.ready = True
        log.info("gateway ready: database migrated, feed primed")


class StartingGate(Interceptor):
    """UNAVAILABLE for every call but health's and reflection's until `startup` is ready."""

    def __init__(self, startup: Startup) -> None:
        self._startup = startup

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or self._startup.ready
            or service_of(handler_call_details.method) in OPEN_SERVICES
        ):
            return handler
        return refusal(
            handler,
            Unavailable(
                "the gateway is starting and waits for its database "
                f"({self._startup.waiting_for}); retry shortly",
                STARTING_RETRY_SECONDS,
            ),
        )
