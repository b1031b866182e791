"""The command's exit codes, and its errors as one line a person can act on.

  0  done (a task or batch that succeeded, a listing, a cancel recorded)
  1  the task or batch failed or was cancelled; or the gateway could not do it now
  2  bad usage: a wrong option, page, id or filter (click's usage errors, INVALID_ARGUMENT,
     NOT_FOUND, ALREADY_EXISTS)
  3  the gateway is unreachable, did not answer in time, or refused the token
130  interrupted (Ctrl-C) and left running
"""

from __future__ import annotations

import grpc

from harvester.calls import Batch, Task
from harvester.connection import ENV_ADDRESS, ENV_TOKEN
from harvester.errors import HarvesterError
from projects.v1 import task_pb2

DONE = 0
FAILED = 1
USAGE = 2
UNREACHABLE = 3
INTERRUPTED = 130

_USAGE_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}
_UNREACHABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}

TOKEN_HINT = (
    f"pass --token or set {ENV_TOKEN}: `make run` prints a token, and a deployment's tokens are "
    "its API_TOKENS setting (name:token pairs), from whoever runs the gateway"
)


def exit_code_of(error: HarvesterError) -> int:
    if error.code in _USAGE_CODES:
        return USAGE
    if error.code in _UNREACHABLE_CODES:
        return UNREACHABLE
    return FAILED


def exit_code_for(item: Task | Batch) -> int:
    """0 unless the task or batch ended FAILURE or REVOKED."""
    bad = {task_pb2.TASK_STATUS_FAILURE, task_pb2.TASK_STATUS_REVOKED}
    return FAILED if item.status in bad else DONE


def describe(error: HarvesterError, address: str, token_given: bool) -> str:
    """One line: what went wrong and what to do about it."""
    code = error.code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if not token_given:
            return f"no token given: {TOKEN_HINT}"
        return f"the gateway at {address} refused the token ({error.message}): {TOKEN_HINT}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the gateway at {address} ({error.message}); is it running? "
            f"Set --address or {ENV_ADDRESS} if it listens elsewhere"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"the gateway at {address} did not answer in time ({error.message}); "
            "try again, or raise --deadline"
        )
    if error.field_violations:
        return "; ".join(f"{v.field}: {v.description}" for v in error.field_violations)
    return f"{error.message} ({code.name})"
