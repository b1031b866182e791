"""`python -m gateway`: serve the gRPC gateway at GATEWAY_ADDRESS (GATEWAY_PROCESSES of them)."""

import asyncio
import logging
import sys

from core.settings import get_settings
from gateway.processes import run_processes
from gateway.server import serve


def main() -> None:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.gateway_processes > 1:
        sys.exit(run_processes(settings))
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
