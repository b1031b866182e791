"""The client's errors: one tree, each carrying the status code, the message and the details.

    HarvesterError                 code, message, field_violations, retry_delay
     ├── Unauthenticated           UNAUTHENTICATED     no token, or one the gateway refused
     ├── InvalidArgument           INVALID_ARGUMENT    .field_violations (google.rpc.BadRequest)
     ├── NotFound                  NOT_FOUND           an id never issued to this token, or expired
     ├── AlreadyExists             ALREADY_EXISTS      a request_id reused for another request
     ├── FailedPrecondition        FAILED_PRECONDITION cancel of a task or batch that has ended
     ├── ResourceExhausted         RESOURCE_EXHAUSTED  .retry_delay (google.rpc.RetryInfo)
     ├── Unavailable               UNAVAILABLE         still so after the client's retries
     └── DeadlineExceeded          DEADLINE_EXCEEDED   no answer within the call's deadline

Any other status (INTERNAL, UNKNOWN, ...) is a plain HarvesterError with its code. The client
translates gRPC's errors here and only here (`from_rpc_error`), `raise ... from` the original,
so a caller catches ours and never grpc.RpcError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

# Where grpcio-status puts the google.rpc.Status with the details (gRPC's own convention).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field of the request and what is wrong with it (google.rpc.BadRequest)."""

    field: str
    description: str


class HarvesterError(Exception):
    """The gateway answered with a status other than OK, or did not answer at all."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field_violations = field_violations
        self.retry_delay = retry_delay  # seconds the gateway asked us to wait, if it said

    def __str__(self) -> str:
        return self.message


class Unauthenticated(HarvesterError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class InvalidArgument(HarvesterError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HarvesterError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(HarvesterError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(HarvesterError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(HarvesterError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(HarvesterError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(HarvesterError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[HarvesterError]] = {
    cls.default_code: cls
    for cls in (
        Unauthenticated,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
    )
}


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the error's trailers (sync and asyncio errors alike), if any."""
    trailers = getattr(error, "trailing_metadata", None)
    metadata = trailers() if callable(trailers) else None
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def from_rpc_error(error: grpc.RpcError) -> HarvesterError:
    """Our error for one of gRPC's: the class of its code, its message and its details."""
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(error, "details", None)
    message = (details_of() if callable(details_of) else None) or str(code.name).lower()
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    status = _rich_status(error)
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            violations += [
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            ]
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            packed.Unpack(retry_info)
            retry_delay = retry_info.retry_delay.ToTimedelta().total_seconds()
    cls = _BY_CODE.get(code, HarvesterError)
    return cls(message, code=code, field_violations=tuple(violations), retry_delay=retry_delay)
