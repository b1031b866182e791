"""A slow, lossy link in user space: `python -m tests.cluster.slowlink --delay S --loss P NS...`.

Why not `tc qdisc ... netem`: this machine's kernel is built without CONFIG_NET_SCH_NETEM (`tc`
answers "Specified qdisc kind is unknown"), and tbf/htb shape rates, not delays. So each slow
host gets a TUN device (`tun0`) in its own namespace, and a peer TUN device (`sl<n>`) here, in
the router's namespace where this program runs; every IP packet read from one side is written
to the other after `--delay` seconds, or dropped with probability `--loss`. Both directions:
netem on both ends of a veth pair would do the same. The router forwards between its peers and
the bridge (tests/cluster/harness.py sets the addresses and routes once this prints
"slow link ready").

The devices exist as long as this process holds them: stopping it removes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import os
import random
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_PACKET = 65535

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def open_tun(name: str) -> int:
    """A TUN device `name` in the calling thread's network namespace; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def open_tun_in(netns: str, name: str) -> int:
    """A TUN device in namespace `netns` (/run/netns/NAME), opened from here."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(there)
        return open_tun(name)
    finally:
        _setns(here)
        os.close(there)
        os.close(here)


class Link:
    """Packets from one fd to another, each delayed or dropped."""

    def __init__(self, delay: float, loss: float, rng: random.Random) -> None:
        self.delay = delay
        self.loss = loss
        self.rng = rng
        self.loop = asyncio.get_running_loop()

    def forward(self, source: int, target: int) -> None:
        def readable() -> None:
            while True:
                try:
                    packet = os.read(source, MAX_PACKET)
                except BlockingIOError:
                    return
                if self.rng.random() < self.loss:
                    continue
                self.loop.call_later(self.delay, self._write, target, packet)

        self.loop.add_reader(source, readable)

    @staticmethod
    def _write(target: int, packet: bytes) -> None:
        # A full device queue or a peer gone down: the packet is lost, as on a wire.
        with contextlib.suppress(OSError):
            os.write(target, packet)


async def run(args: argparse.Namespace) -> None:
    link = Link(args.delay, args.loss, random.Random(args.seed))
    pairs = [(open_tun_in(netns, "tun0"), open_tun(f"sl{n}")) for n, netns in enumerate(args.hosts)]
    for far, near in pairs:
        link.forward(far, near)
        link.forward(near, far)
    print("slow link ready", flush=True)
    await asyncio.Event().wait()  # until SIGTERM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.slowlink", description=__doc__)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds, each way")
    parser.add_argument("--loss", type=float, default=0.05, help="probability, each way")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("hosts", nargs="+", help="network namespaces to give a slow tun0")
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
