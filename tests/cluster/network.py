"""Hosts as Linux network namespaces on one bridge: the cluster harness's network.

Every name a run makes carries its owner's pid and the run's letter within that process
(`hvc<pid>-<r>-<host>` for namespaces, `hvc<pid>-<r>` for the bridge, `hv<pid>-<r>x<n>` for the
host side of a veth pair: interface names hold 15 characters), so two runs never collide, not
even two clusters of one test process, and a run that was killed before it could clean up is
recognised by the next one (its pid is gone) and removed then: `remove_leftovers()`.

The test process itself stays in the machine's namespace and reaches the hosts through the
bridge, which has the subnet's first address; nothing crosses hosts over 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import signal
import string
import subprocess
import time
from dataclasses import dataclass, field

IP = "ip"
PREFIX = "hvc"
_OURS = re.compile(rf"^{PREFIX}(\d+)-")
_LINK_OURS = re.compile(rf"^(?:{PREFIX}|hv)(\d+)")


class NetworkError(RuntimeError):
    """An `ip` command failed; the message has the command and what it printed."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = [IP, *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def links() -> list[str]:
    """Names of the machine namespace's links."""
    found = re.findall(r"^\d+: ([^:@]+)[:@]", ip("-o", "link", "show"), re.MULTILINE)
    return [name.strip() for name in found]


def kill_namespace(name: str) -> None:
    """SIGKILL every process in namespace `name`, wait until they are gone, then delete it
    (a namespace with processes in it outlives `ip netns delete`, and so do its links)."""
    deadline = time.monotonic() + 10
    while True:
        pids = [int(p) for p in ip("netns", "pids", name, check=False).split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetworkError(f"processes {pids} in {name} did not die")
        time.sleep(0.05)
    ip("netns", "delete", name, check=False)


def remove_run(pid: int, run: str | None = None) -> None:
    """Remove every namespace and link of process `pid`'s runs (only run `run`'s if given)."""

    def ours(match: re.Match[str] | None) -> bool:
        return match is not None and int(match.group(1)) == pid

    for name in namespaces():
        if ours(_OURS.match(name)) and (run is None or name.startswith(f"{PREFIX}{pid}-{run}-")):
            kill_namespace(name)
    for link in links():
        mine = run is None or link == f"{PREFIX}{pid}-{run}" or link.startswith(f"hv{pid}-{run}x")
        if ours(_LINK_OURS.match(link)) and mine:
            ip("link", "delete", link, check=False)


def remove_leftovers() -> list[int]:
    """Remove what runs whose process is gone left behind; their pids."""
    owners = {int(m.group(1)) for n in namespaces() if (m := _OURS.match(n))}
    owners |= {int(m.group(1)) for n in links() if (m := _LINK_OURS.match(n))}
    dead = sorted(pid for pid in owners if not _pid_alive(pid))
    for pid in dead:
        remove_run(pid)
    return dead


def leftovers_of(pid: int) -> list[str]:
    """The namespaces and links of the run of `pid` that still exist."""
    found = [n for n in namespaces() if (m := _OURS.match(n)) and int(m.group(1)) == pid]
    found += [n for n in links() if (m := _LINK_OURS.match(n)) and int(m.group(1)) == pid]
    return found


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no route of the machine covers (another run's, a LAN's)."""
    taken = [
        ipaddress.ip_network(word, strict=False)
        for word in re.findall(r"^(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", ip("-4", "route"), re.MULTILINE)
    ]
    pid = os.getpid()
    for attempt in range(256):
        second, third = 200 + (pid + attempt) % 50, (pid // 50 + attempt * 7) % 256
        candidate = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise NetworkError("no free /24 in 10.200.0.0/16-10.249.0.0/16")


_RUNS = itertools.count()
_RUN_LETTERS = string.ascii_lowercase + string.digits


def _next_run() -> str:
    return _RUN_LETTERS[next(_RUNS) % len(_RUN_LETTERS)]


@dataclass
class Network:
    """A bridge in the machine's namespace and one namespace per host joined to it by veth.

    Hosts live in the lower half of the subnet (/25); the upper half is for slow links
    (tests/cluster/slowlink.py), routed through a router host.
    """

    pid: int = field(default_factory=os.getpid)
    run: str = field(default_factory=_next_run)
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    hosts: dict[str, str] = field(default_factory=dict)  # host -> address
    veths: dict[str, str] = field(default_factory=dict)  # host -> host-side veth name
    cuts: set[tuple[str, str]] = field(default_factory=set)

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.pid}-{self.run}"

    @property
    def prefix_length(self) -> int:
        return self.subnet.prefixlen + 1

    @property
    def slow_subnet(self) -> ipaddress.IPv4Network:
        return list(self.subnet.subnets(1))[1]

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @property
    def test_address(self) -> str:
        """The machine's own address on the bridge: where the test process talks from."""
        return self.address(1)

    def netns(self, host: str) -> str:
        return f"{PREFIX}{self.pid}-{self.run}-{host}"

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.test_address}/{self.prefix_length}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, host: str, index: int) -> str:
        """Namespace `host` with address .index on the bridge (its link `eth0`); the address."""
        name = self.netns(host)
        veth = f"hv{self.pid}-{self.run}x{index}"
        address = self.address(index)
        ip("netns", "add", name)
        ip("link", "set", "lo", "up", netns=name)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("addr", "add", f"{address}/{self.prefix_length}", "dev", "eth0", netns=name)
        ip("link", "set", "eth0", "up", netns=name)
        self.hosts[host] = address
        self.veths[host] = veth
        return address

    def link_down(self, host: str) -> None:
        """Cut `host` off: its cable pulled (the bridge side of its veth down)."""
        ip("link", "set", self.veths[host], "down")

    def link_up(self, host: str) -> None:
        ip("link", "set", self.veths[host], "up")

    def partition(self, host: str, other: str) -> None:
        """Drop every packet between `host` and `other`, both ways, silently (as a broken
        switch would: open connections hang rather than reset)."""
        ip("route", "add", "blackhole", f"{self.hosts[other]}/32", netns=self.netns(host))
        ip("route", "add", "blackhole", f"{self.hosts[host]}/32", netns=self.netns(other))
        self.cuts.add((host, other))

    def heal(self, host: str, other: str) -> None:
        ip("route", "del", "blackhole", f"{self.hosts[other]}/32", netns=self.netns(host))
        ip("route", "del", "blackhole", f"{self.hosts[host]}/32", netns=self.netns(other))
        self.cuts.discard((host, other))

    def heal_all(self) -> None:
        for host, other in list(self.cuts):
            self.heal(host, other)

    def destroy(self) -> None:
        """Every namespace (and the processes in it), link and the bridge of this run."""
        remove_run(self.pid, self.run)
