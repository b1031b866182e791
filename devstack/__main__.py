"""`python -m devstack` (what `make run` runs): see devstack.launcher."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from core.settings import settings_or_exit
from devstack.launcher import run

DESCRIPTION = """\
Run the whole harvester on this machine, to try it out (`make run` runs this): the embedded
Redis broker, the bundled sample site, the gateway (`python -m gateway`) and one worker
(`celery -A worker.app worker -n devstack-worker@%h`). Once all of them are ready it prints
where they are, a token and grpcurl lines to paste; Ctrl-C stops them all (the embedded Redis
too, unless a gateway or worker started on its own still uses it). It stops at once if the
gateway's or the sample site's port is in use.

Settings come from environment variables and a .env file in the working directory. The
README's settings table lists them all; `python -m core.settings_doc` prints it. With
CELERY_BROKER_URL set the embedded Redis is not started, with SOURCE_URL set the sample site
is not, with API_TOKENS set no token is made up. GATEWAY_ADDRESS and SAMPLE_SITE_ADDRESS move
the ports; DATA_DIR (default: data) holds the SQLite database and the embedded Redis."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devstack",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    settings = settings_or_exit()
    logging.basicConfig(level=logging.INFO, format="[devstack] %(message)s")
    return run(settings, os.environ)


if __name__ == "__main__":
    sys.exit(main())
