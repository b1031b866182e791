"""The harvester on many hosts: `Cluster`, each host a network namespace (tests/cluster/network.py).

    with cluster(tmp_path, workers=4) as c:
        task = upload(c.gateways[0], 1)

Hosts and their addresses (.N of the run's subnet): the test process on the bridge (.1), `redis`
(.2, a redis-server of its own), `pg` (.3, a PostgreSQL cluster of its own, made with the
machine's initdb), `site` (.4, the sample site), `rabbit` (.5, only with the AMQP broker),
`router` (.9, only with slow links), `gw1`/`gw2` (.10, .11), `w1`..`w4` (.21...). Each process
runs in its host's namespace (`ip netns exec`) and binds only that host's address.

Leaving the `with` block, also through an exception or a Ctrl-C, stops every process and
removes every namespace and link the run made; a run killed outright is cleaned up by the next
one (network.remove_leftovers()).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from sqlalchemy import text

from core.db import create_engine
from core.embedded_redis import server_executable
from tests.cluster import network
from tests.cluster.network import Network, ip
from tests.support.processes import (
    BIN,
    PYTHON,
    Gateway,
    PostgresServer,
    Process,
    Site,
    clean_environment,
    poll_until,
    postgres_bin,
)
from tests.support.stack import TEST_TOKEN, Stack

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PORT = 50051
SITE_PORT = 8000
REDIS_PORT = 6379
PG_PORT = 5432
AMQP_PORT = 5672
READY_TIMEOUT = 60.0

# What a scenario stores and the ledger counts, emptied between scenarios sharing a cluster (not
# `feed`: its one row hands out the revisions).
TABLES = ("projects", "page_memos")

HOST_INDEX = {"redis": 2, "pg": 3, "site": 4, "rabbit": 5, "router": 9, "gw1": 10, "gw2": 11}


def worker_host(n: int) -> str:
    return f"w{n}"


HOST_INDEX.update({worker_host(n): 20 + n for n in range(1, 9)})


class ClusterError(RuntimeError):
    """A host's process did not come up; the message has its log."""


def in_netns(netns: str, args: list[str]) -> list[str]:
    return [network.IP, "netns", "exec", netns, *args]


@dataclass
class Cluster:
    directory: Path
    net: Network
    env: dict[str, str]
    site: Site
    stack: Stack  # the database as the fault ledger reads it
    postgres: PostgresServer
    processes: list[Process] = field(default_factory=list)
    gateway_hosts: list[str] = field(default_factory=list)
    worker_hosts: list[str] = field(default_factory=list)
    concurrency: int = 4
    gateways: dict[str, Gateway] = field(default_factory=dict)
    workers: dict[str, Process] = field(default_factory=dict)

    def start_process(
        self, host: str, name: str, args: list[str], env: Mapping[str, str]
    ) -> Process:
        process = Process(name, in_netns(self.net.netns(host), args), env, self.directory)
        self.processes.append(process)
        return process

    def start_gateway(self, host: str, **extra: str) -> Gateway:
        address = f"{self.net.hosts[host]}:{GATEWAY_PORT}"
        env = clean_environment({**self.env, "GATEWAY_ADDRESS": address, **extra})
        env["DATA_DIR"] = str(self.directory / host)
        process = self.start_process(host, host, [PYTHON, "-m", "gateway"], env)
        process.wait_for_line(r"gateway ready", READY_TIMEOUT)
        gateway = Gateway(process, address, TEST_TOKEN)
        self.gateways[host] = gateway
        return gateway

    def stop_gateway(self, host: str) -> None:
        self.gateways.pop(host).close()

    def start_worker(
        self, host: str, concurrency: int = 4, ready: bool = True, **extra: str
    ) -> Process:
        env = clean_environment({**self.env, "WORKER_CONCURRENCY": str(concurrency), **extra})
        env["DATA_DIR"] = str(self.directory / host)
        args = [
            str(BIN / "celery"), "-A", "worker.app", "worker", "--loglevel", "INFO",
            "--concurrency", str(concurrency), "--hostname", f"{host}-{uuid.uuid4().hex[:6]}@%h",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        process = self.start_process(host, host, args, env)
        if ready:
            process.wait_for_line(r"ready\.", READY_TIMEOUT)
        self.workers[host] = process
        return process

    def stop_worker(self, host: str) -> None:
        self.workers.pop(host).stop()

    def add_host(self, host: str) -> str:
        return self.net.add_host(host, HOST_INDEX[host])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user and system) each host's processes have used so far, by host: every
        process in its namespace (`ip netns pids`), PostgreSQL's backends included."""
        spent: dict[str, float] = {}
        for host in self.net.hosts:
            total = 0.0
            for pid in ip("netns", "pids", self.net.netns(host), check=False).split():
                with contextlib.suppress(psutil.Error):
                    times = psutil.Process(int(pid)).cpu_times()
                    total += times.user + times.system
            spent[host] = total
        return spent

    def reset(self) -> None:
        """Between two scenarios on one cluster: every gateway and worker host running and
        connected, the site as new, the tables empty (the ledger counts the whole table), no
        partition left."""
        for n in range(1, len(self.gateway_hosts) + 1):
            self.net.link_up(f"gw{n}")
        for host in self.worker_hosts:
            self.net.link_up(host)
        self.net.heal_all()
        for host in self.gateway_hosts:
            if host not in self.gateways:
                self.start_gateway(host)
        for host in self.worker_hosts:
            if host not in self.workers or self.workers[host].popen.poll() is not None:
                self.workers.pop(host, None)
                self.start_worker(host, self.concurrency)
        self.site.reset()
        self.execute(f"TRUNCATE {', '.join(TABLES)}")

    def execute(self, statement: str) -> None:
        """Run one SQL statement on the cluster's database, committed."""

        async def run() -> None:
            engine = create_engine(self.stack.database_url)
            try:
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
            finally:
                await engine.dispose()

        asyncio.run(run())

    def slow_address(self, host: str) -> str:
        return str(self.net.slow_subnet.network_address + HOST_INDEX[host])

    @contextlib.contextmanager
    def slow_links(self, hosts: list[str], delay: float, loss: float) -> Iterator[Process]:
        """While inside, `hosts` reach the others only through tests/cluster/slowlink.py's
        delayed, lossy TUN link to the router (their bridge link is down); start their
        processes inside. Why not netem: see slowlink.py."""
        args = [PYTHON, "-m", "tests.cluster.slowlink", "--delay", str(delay), "--loss", str(loss)]
        env = clean_environment({"PYTHONPATH": str(REPO)})
        link = self.start_process("router", "slowlink", [*args, *map(self.net.netns, hosts)], env)
        router = self.net.netns("router")
        servers = [self.net.netns(h) for h in ("redis", "pg", "site")]
        try:
            link.wait_for_line("slow link ready", READY_TIMEOUT)
            subprocess.run(
                in_netns(router, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]),
                check=True,
            )
            for n, host in enumerate(hosts):
                ip("link", "set", f"sl{n}", "up", netns=router)
                ip("route", "add", f"{self.slow_address(host)}/32", "dev", f"sl{n}", netns=router)
                ns = self.net.netns(host)
                ip("link", "set", "eth0", "down", netns=ns)
                ip("link", "set", "tun0", "up", netns=ns)
                ip("addr", "add", f"{self.slow_address(host)}/32", "dev", "tun0", netns=ns)
                ip("route", "add", "default", "dev", "tun0", netns=ns)
            for ns in servers:
                ip(
                    "route",
                    "add",
                    str(self.net.slow_subnet),
                    "via",
                    self.net.hosts["router"],
                    netns=ns,
                )
            yield link
        finally:
            link.stop()  # its TUN devices, and the routes through them, go with it
            self.processes.remove(link)
            for ns in servers:
                ip("route", "del", str(self.net.slow_subnet), netns=ns, check=False)
            for host in hosts:
                ip("link", "set", "eth0", "up", netns=self.net.netns(host))

    def postmaster_pid(self) -> int:
        return self.postgres.processes()[0].pid

    def logs(self) -> str:
        return "\n\n".join(f"===== {p.name} =====\n{p.output()}" for p in self.processes)

    def close(self) -> None:
        for gateway in self.gateways.values():
            gateway.channel.close()
        for process in reversed(self.processes):
            process.stop(timeout=10)
        self.postgres.close()
        self.net.destroy()


def _start_redis(c: Cluster) -> str:
    address = c.net.hosts["redis"]
    directory = c.directory / "redis"
    directory.mkdir()
    args = [
        server_executable(), "--bind", address, "--port", str(REDIS_PORT),
        "--dir", str(directory), "--save", "", "--appendonly", "no",
        "--protected-mode", "no", "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    process = c.start_process("redis", "redis", args, clean_environment({}))
    process.wait_for_line(r"Ready to accept connections", READY_TIMEOUT)
    return f"redis://{address}:{REDIS_PORT}/0"


@contextlib.contextmanager
def cluster(
    directory: Path,
    *,
    workers: int = 4,
    gateways: int = 2,
    concurrency: int = 4,
    start_workers: bool = True,
    broker: Callable[[Cluster], str] | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Cluster]:
    """A running cluster: redis, pg, site, `gateways` gateways and `workers` workers on hosts of
    their own, with `settings` (the README's table) in every gateway's and worker's environment.
    With `start_workers=False` the worker hosts exist but run nothing yet. `broker(cluster)`,
    if given, starts another broker and returns its URL (Redis then keeps the results only)."""
    network.remove_leftovers()
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise ClusterError("initdb/pg_ctl not found: the cluster's database host needs them")
    directory = directory.resolve()
    net = Network()
    made: Cluster | None = None
    # SIGTERM (a CI runner giving up) ends the run like Ctrl-C: through the cleanup below.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        net.create()
        for host in ("redis", "pg", "site", "router", *(f"gw{n}" for n in range(1, gateways + 1))):
            net.add_host(host, HOST_INDEX[host])
        for n in range(1, workers + 1):
            net.add_host(worker_host(n), HOST_INDEX[worker_host(n)])
        # The whole subnet: workers behind a slow link come from its upper half, which the
        # pg host's own /25 (pg_hba's `samenet`) does not cover.
        postgres = PostgresServer(
            bin_dir,
            net.hosts["pg"],
            PG_PORT,
            wrap=in_netns(net.netns("pg"), []),
            clients=str(net.subnet),
        )
        site_address = f"{net.hosts['site']}:{SITE_PORT}"
        site_process = Process(
            "site",
            in_netns(
                net.netns("site"),
                [PYTHON, "-m", "sample_site", "--address", site_address, "--control"],
            ),
            clean_environment({}),
            directory,
        )
        site = Site(site_process, site_process.wait_for_line(r"listening on (http://\S+)").group(1))
        run = uuid.uuid4().hex[:8]
        env = {
            "SOURCE_URL": site.source_url,
            "API_TOKENS": f"tester:{TEST_TOKEN}",
            "TASK_QUEUE": f"harvest-{run}",
            "DATABASE_URL": postgres.url,
            "RETRY_BASE_DELAY_SECONDS": "0.2",
            "RETRY_MAX_DELAY_SECONDS": "1",
            "RETRY_AFTER_CAP_SECONDS": "2",
            "BROKER_CHECK_INTERVAL_SECONDS": "0.5",
            "SOURCE_MAX_REQUESTS_PER_SECOND": "10000",
            "SOURCE_MAX_CONCURRENCY": "1000",
            "LOG_LEVEL": "INFO",
        }
        stack = Stack(directory, {**env, "DATA_DIR": str(directory / "ledger")}, site)
        made = Cluster(
            directory, net, env, site, stack, postgres, [site_process],
            [f"gw{n}" for n in range(1, gateways + 1)],
            [worker_host(n) for n in range(1, workers + 1)],
            concurrency,
        )  # fmt: skip
        postgres.start()
        env["CELERY_BROKER_URL"] = _start_redis(made)
        if broker is not None:
            env["CELERY_RESULT_BACKEND"] = env["CELERY_BROKER_URL"]
            env["CELERY_BROKER_URL"] = broker(made)
        env.update(settings or {})
        for host in made.gateway_hosts:
            made.start_gateway(host)
        if start_workers:
            for host in made.worker_hosts:
                made.start_worker(host, concurrency)
        yield made
    finally:
        try:
            if made is not None:
                made.close()
            else:
                net.destroy()
        finally:
            signal.signal(signal.SIGTERM, previous)


def require_tools() -> None:
    """The harness drives `ip` (iproute2) as root; say so when that is missing."""
    if shutil.which(network.IP) is None:
        raise ClusterError("`ip` (iproute2) is not installed")
    done = subprocess.run([network.IP, "netns", "list"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"`ip netns` does not work here (root needed): {done.stderr}")


RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def start_rabbitmq(c: Cluster) -> str:
    """A RabbitMQ node of the run's own on host `rabbit` (never the machine's node); its URL.

    The machine's /etc/rabbitmq files pin the node to 127.0.0.1, so this node reads files of its
    own: listening on the host's address, guest allowed from other hosts (loopback_users), no
    plugins, its own node name, cookie (HOME), data and logs, and epmd in its namespace.
    Debian's /usr/sbin/rabbitmq-server would `su` to the rabbitmq user with a fixed HOME and
    log directory: the script under /usr/lib is started instead.
    """
    if not RABBITMQ_SERVER.exists():
        raise ClusterError(f"{RABBITMQ_SERVER} not found: no RabbitMQ node for the broker host")
    address = c.add_host("rabbit")
    home = c.directory / "rabbit"
    home.mkdir()
    (home / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = {address}:{AMQP_PORT}\nloopback_users = none\n"
    )
    (home / "rabbitmq-env.conf").write_text("")
    (home / "enabled_plugins").write_text("[].\n")
    env = clean_environment(
        {
            "HOME": str(home),
            "RABBITMQ_NODENAME": f"hvc{c.net.pid}{c.net.run}@localhost",
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_NODE_IP_ADDRESS": address,
            "RABBITMQ_NODE_PORT": str(AMQP_PORT),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_LOGS": "-",
        }
    )
    process = c.start_process("rabbit", "rabbitmq", [str(RABBITMQ_SERVER)], env)
    process.wait_for_line(r"Server startup complete|started TCP listener", 120)
    poll_until(lambda: _accepts(address, AMQP_PORT), 60, 0.2, "RabbitMQ to accept connections")
    return f"amqp://guest:guest@{address}:{AMQP_PORT}//"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
