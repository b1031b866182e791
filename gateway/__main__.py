"""`python -m gateway`: serve the gRPC gateway at GATEWAY_ADDRESS (GATEWAY_PROCESSES of them)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from core.logs import configure as configure_logging
from core.settings import settings_or_exit
from gateway.processes import cannot_listen_message, listen_problem, run_processes
from gateway.server import serve

DESCRIPTION = """\
Serve the gRPC gateway: projects.v1.QueueService (Upload, GetStatus), health and reflection, on
GATEWAY_ADDRESS (127.0.0.1:50051 unless set), until SIGTERM or Ctrl-C. It migrates the database
first; GATEWAY_PROCESSES above 1 runs that many gateway processes on the one port.

Settings come from environment variables and a .env file in the working directory. The
README's settings table lists them all; `python -m core.settings_doc` prints it. Unset
API_TOKENS: the gateway makes up one token for client 'default' and prints it once. Unset
CELERY_BROKER_URL: it uses the embedded Redis in DATA_DIR, starting it if no process has; the
last process using it stops it when it exits (`python -m core.embedded_redis stop` stops one
left behind by a process that was killed).

The harvest itself is done by workers: `celery -A worker.app worker`. `make run` starts the
whole service on one machine."""

IN_USE_HINT = "is another gateway (or make run) up? GATEWAY_ADDRESS sets where it listens"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    address = settings.gateway_address
    # Before the migrations and the broker: a second gateway on a port in use says so and stops.
    reason = listen_problem(address, settings.gateway_reuse_port)
    if reason is not None:
        print(cannot_listen_message(address, reason, IN_USE_HINT), file=sys.stderr)
        return 1
    if settings.gateway_processes > 1:
        return run_processes(settings)
    try:
        asyncio.run(serve(settings))
    except RuntimeError as error:
        # grpc's bind failure, when the port was taken between the check and the bind.
        if not str(error).startswith("Failed to bind to address"):
            raise
        reason = listen_problem(address, settings.gateway_reuse_port) or "grpc's error is above"
        print(cannot_listen_message(address, reason, IN_USE_HINT), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
