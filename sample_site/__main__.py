"""Run the sample site: `python -m sample_site [--address HOST:PORT] [--control]`.

Prints one line, `sample site listening on http://HOST:PORT`, once the socket is bound (with the
real port when asked for port 0, so a parent process can read where to connect), then serves
until SIGTERM or SIGINT and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from core.settings import get_settings
from sample_site.server import make_server


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    address = args.address or get_settings().sample_site_address
    server = make_server(_split_address(address), control=args.control)

    stop = threading.Event()

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # serve_forever runs in a thread because shutdown() waits for it to return: called from a
    # signal handler on the serving thread itself, it would wait forever.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    serving = threading.Thread(target=server.serve_forever, name="sample-site", daemon=True)
    serving.start()

    # The bound address, not the requested one: port 0 became a real port by now.
    host = str(server.server_address[0])
    shown_host = f"[{host}]" if ":" in host else host
    print(f"sample site listening on http://{shown_host}:{server.server_port}", flush=True)

    stop.wait()
    server.shutdown()
    server.server_close()
    serving.join()
    logging.getLogger(__name__).info("sample site stopped")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sample_site", description=__doc__)
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="where to listen (default: SAMPLE_SITE_ADDRESS from the settings); port 0 picks one",
    )
    parser.add_argument(
        "--control", action="store_true", help="enable the /_control API that tests use"
    )
    args = parser.parse_args(argv)
    if args.address is not None:
        try:
            _split_address(args.address)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {address!r} must look like HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


if __name__ == "__main__":
    sys.exit(main())
