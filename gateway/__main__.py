"""`python -m gateway`: serve the gRPC gateway at GATEWAY_ADDRESS."""

import asyncio
import logging

from core.settings import get_settings
from gateway.server import serve


def main() -> None:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
