"""What the cluster scenarios share: clients of their own, settling through another gateway."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from projects.v1 import task_pb2
from tests.faults.ledger import Ledger
from tests.support.processes import Gateway
from tests.support.stack import TERMINAL, get_status


def clients(gateway: Gateway, count: int) -> list[Gateway]:
    """`count` clients of `gateway`, each with a channel (a TCP connection) of its own."""
    return [Gateway(gateway.process, gateway.address, gateway.token) for _ in range(count)]


def close_clients(made: list[Gateway]) -> None:
    for client in made:
        client.channel.close()


def settle_through(
    ledger: Ledger,
    gateway_of: Callable[[str], Gateway],
    timeout: float,
    threads: int = 16,
) -> dict[str, int]:
    """Ask `gateway_of(request_id)` for each accepted task until all are terminal or the time
    is up (the ledger counts the rest as lost); how many GetStatus calls failed, by code."""
    deadline = time.monotonic() + timeout
    pending = dict(ledger.accepted)
    errors: dict[str, int] = {}

    def ask(item: tuple[str, str]) -> tuple[str, task_pb2.Task | None]:
        request_id, task_id = item
        try:
            return request_id, get_status(gateway_of(request_id), task_id)
        except grpc.RpcError as error:
            code = error.code().name
            errors[code] = errors.get(code, 0) + 1
            return request_id, None

    with ThreadPoolExecutor(threads) as pool:
        while pending and time.monotonic() < deadline:
            for request_id, task in pool.map(ask, list(pending.items())):
                if task is not None and task.status in TERMINAL:
                    ledger.final[request_id] = task
                    del pending[request_id]
            if pending:
                time.sleep(0.5)
    return errors
