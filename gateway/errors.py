"""The gateway's errors and the one table that turns them into gRPC statuses.

    ServiceError
     ├── Unauthenticated      UNAUTHENTICATED   missing, garbled or unknown token
     ├── InvalidArgument      INVALID_ARGUMENT  + google.rpc.BadRequest field violation
     ├── NotFound             NOT_FOUND         never issued to this client, or expired
     ├── AlreadyExists        ALREADY_EXISTS    request_id reused for another page
     ├── ResourceExhausted    RESOURCE_EXHAUSTED + google.rpc.RetryInfo
     └── Unavailable          UNAVAILABLE       + google.rpc.RetryInfo (broker or database down)

Handlers raise these; `abort` sends them with rich details through grpcio-status. Anything else
that escapes a handler is logged and answered INTERNAL without leaking its text.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An answer other than OK, with a message that tells the caller what to do."""

    def __init__(self, message: str, *details: Message) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Unauthenticated(ServiceError):
    pass


class InvalidArgument(ServiceError):
    def __init__(self, field: str, description: str) -> None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=description
        )
        super().__init__(
            f"{field}: {description}", error_details_pb2.BadRequest(field_violations=[violation])
        )


class NotFound(ServiceError):
    pass


class AlreadyExists(ServiceError):
    pass


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = math.floor(seconds)
    delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class ResourceExhausted(ServiceError):
    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message, _retry_info(retry_after_seconds))


class Unavailable(ServiceError):
    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message, _retry_info(retry_after_seconds))


STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def to_status(error: ServiceError) -> grpc.Status:
    code: grpc.StatusCode = STATUS_CODES[type(error)]
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
        except ServiceError as error:
            await abort(context, error)  # type: ignore[arg-type]
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal error in the gateway; see its log"
            )
            raise

    return wrapper
