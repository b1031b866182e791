"""The gateway's errors; each class carries the gRPC status code it is answered with.

    ServiceError
     ├── Unauthenticated        UNAUTHENTICATED     missing, garbled or unknown token
     ├── InvalidArgument        INVALID_ARGUMENT    + google.rpc.BadRequest field violation
     ├── NotFound               NOT_FOUND           never issued to this client, or expired
     ├── AlreadyExists          ALREADY_EXISTS      request_id reused for another page
     ├── FailedPrecondition     FAILED_PRECONDITION cancel of a task or batch that has ended
     ├── ResourceExhausted      RESOURCE_EXHAUSTED  + google.rpc.RetryInfo
     └── Unavailable            UNAVAILABLE         + google.rpc.RetryInfo
          ├── StoreUnavailable                      the database did not answer
          │    └── StoreContended                   it answered, but gave up a change for a
          │                                         concurrent one (a deadlock)
          └── QueueUnavailable                      the broker or the result backend did not

Handlers (and the modules they call: the records, the queue) raise these; `answers_errors` is
the one place that turns them into statuses, with rich details through grpcio-status. A
subclass inherits its parent's code. Anything else that escapes a handler is logged and
answered INTERNAL without leaking its text.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

STORE_DOWN = "the task database is unreachable; retry shortly"
STORE_CONTENDED = "the task database gave up this change for a concurrent one; retry shortly"
BROKER_DOWN = "the task broker is unreachable; nothing was enqueued; retry shortly"
RESULTS_DOWN = "the task result store is unreachable; retry shortly"
TOO_BUSY = "the gateway could not enqueue it before your deadline; nothing was enqueued; retry"
UNCONFIRMED = (
    "the task broker did not confirm the enqueue in time (it may still run); retry shortly, "
    "with the same request_id to get the same task"
)


class ServiceError(Exception):
    """An answer other than OK, with a message that tells the caller what to do."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *details: Message) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=description
        )
        super().__init__(
            f"{field}: {description}", error_details_pb2.BadRequest(field_violations=[violation])
        )


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = math.floor(seconds)
    delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message, _retry_info(retry_after_seconds))


class Unavailable(ServiceError):
    """A dependency or the gateway itself cannot serve the call now; a retry may succeed.

    `cause` says what went wrong underneath, for the gateway's log; the caller sees `message`.
    """

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_seconds: float = 1.0, cause: str = "") -> None:
        super().__init__(message, _retry_info(retry_after_seconds))
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.message} ({self.cause})" if self.cause else self.message


class StoreUnavailable(Unavailable):
    """The database did not answer (or not in time)."""

    def __init__(self, cause: str, message: str = STORE_DOWN) -> None:
        super().__init__(message, cause=cause)


class StoreContended(StoreUnavailable):
    """The database answered, but gave up the call's transaction for a concurrent one.

    A StoreUnavailable to every caller that handles one (they did before it had a class of its
    own); only the message differs, and the gateway's health is not told (`gateway.database`).
    """

    def __init__(self, cause: str) -> None:
        super().__init__(cause, STORE_CONTENDED)


class QueueUnavailable(Unavailable):
    """The broker or the result backend did not answer (or not in time)."""

    def __init__(self, cause: str, message: str = BROKER_DOWN) -> None:
        super().__init__(message, cause=cause)


def to_status(error: ServiceError) -> grpc.Status:
    code = error.code
    packed = []
    for detail in error.details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.message, details=packed
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort(context: grpc.aio.ServicerContext[object, object], error: ServiceError) -> NoReturn:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Handler = Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
]
StreamHandler = Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], AsyncIterator[Response]
]


async def _answer(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, name: str) -> None:
    """The one translation: a ServiceError as its status, anything else as INTERNAL."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, ServiceError):
        await abort(context, exc)
    log.exception("unexpected error in %s", name, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error in the gateway; see its log")


def answers_errors(
    handler: Handler[Servicer, Request, Response],
) -> Handler[Servicer, Request, Response]:
    """Turn a handler's ServiceError into its status, and anything unexpected into INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await _answer(context, exc, handler.__name__)
            raise

    return wrapper


def answers_stream_errors(
    handler: StreamHandler[Servicer, Request, Response],
) -> StreamHandler[Servicer, Request, Response]:
    """`answers_errors` for a handler that streams its answer (an async generator)."""

    @functools.wraps(handler)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> AsyncIterator[Response]:
        try:
            async for response in handler(self, request, context):
                yield response
        except Exception as exc:
            await _answer(context, exc, handler.__name__)
            raise

    return wrapper
