"""`python -m devstack` (what `make run` runs): see devstack.launcher."""

import logging
import os
import sys

from core.settings import get_settings
from devstack.launcher import run


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[devstack] %(message)s")
    return run(get_settings(), os.environ)


if __name__ == "__main__":
    sys.exit(main())
