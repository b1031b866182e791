"""`watch_fanout_p99_ms`, `watch_fanout_p50_ms`, `watch_fanout_cpu_per_change`: one stored page
of 100 new projects delivered to 1,000 open WatchProjects streams on one gateway.

Two setups, each a fresh PostgreSQL database, a Redis key prefix of its own on the machine's
Redis and a real `python -m gateway` (one process; WATCH_MAX_STREAMS_PER_CLIENT and
GATEWAY_MAX_CONCURRENT_RPCS raised for the streams):

- ours: 1,000 streams (`WatchProjects(from_beginning=True)`), opened by CLIENT_PROCESSES client
  processes of this module (`python -m bench.watch_fanout client ...`), CHANNELS_PER_CLIENT
  grpc.aio channels (connections) each, so the client's CPU is on processes of its own;
- baseline: the same with 1 stream, from one client process.

A round stores 100 new projects (new links: creations) the way a worker does, with
`worker.store.store_projects` on the gateway's database, takes `time.time()` as the commit time
right after it returns, and publishes `core.events.ProjectsChanged(revision)` with
`core.events.EventPublisher` on the gateway's Redis prefix. Every stream records `time.time()`
as each response comes off the call, for every change the response carries; a delay is arrival
minus commit, and a round ends when every stream has its 100 changes (exactly 100, all CREATED,
checked). The figures are the median over the runs of each run's p50 and p99 over all its
deliveries (100,000 a run with 1,000 streams) against the 500 ms target, and the gateway
process's CPU seconds (every thread's run time from /proc/PID/task/*/schedstat, psutil's clock
ticks being too coarse for 1 watcher; read before the store and after the last delivery) per
delivered change, beside the same with 1 watcher. The client processes' CPU per change is in the
note: they share the 2 cores with the gateway. A warm-up round on each setup first proves every
stream is open (each must receive it: from the database if it subscribed after the commit, from
the feed if before). Rounds of the two setups take turns.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.common import Options, say
from bench.list_projects import item, process_cpu_seconds
from bench.report import Figure, median, percentile
from bench.services import (
    REPOSITORY,
    environment,
    gateway,
    postgres_database,
    redis_namespace,
)
from core.db import create_engine
from core.events import EventPublisher, ProjectsChanged, events_url
from core.settings import Settings
from projects.v1 import project_pb2, project_service_pb2, project_service_pb2_grpc
from tests.support.processes import PYTHON, clean_environment
from tests.support.stack import TEST_TOKEN
from worker.store import store_projects

STREAMS = 1000
CLIENT_PROCESSES = 2
CHANNELS_PER_CLIENT = 4
ITEMS = 100
STORE_BATCH = 500  # UPSERT_BATCH_SIZE's default: the page is one batch, one commit
ROUND_TIMEOUT_SECONDS = 180.0
OPEN_TIMEOUT_SECONDS = 120.0


# --- the client process -------------------------------------------------------------------


def _client_main(address: str, streams: int, channels: int, token: str, directory: str) -> None:
    """Open `streams` WatchProjects streams on `channels` connections; answer commands on stdin.

    `expect N` resets the round and answers `ready`; once every stream has received N changes
    the round's arrival times go to a file and the answer is one JSON line (`done`), or after
    ROUND_TIMEOUT_SECONDS a JSON line saying how many arrived (`timeout`).
    """
    asyncio.run(_client(address, streams, channels, token, Path(directory)))


async def _client(address: str, streams: int, channels: int, token: str, directory: Path) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=read_stdin, daemon=True).start()
    metadata = (("authorization", f"Bearer {token}"),)
    opened = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    stubs = [project_service_pb2_grpc.ProjectServiceStub(channel) for channel in opened]
    counts = [0] * streams
    arrivals = array.array("d")
    state = {"target": ITEMS, "complete": 0, "stray": 0, "updated": 0}
    finished = asyncio.Event()
    created = project_pb2.ChangeType.CHANGE_TYPE_CREATED

    async def watch(index: int) -> None:
        call = stubs[index % channels].WatchProjects(
            project_service_pb2.WatchProjectsRequest(from_beginning=True), metadata=metadata
        )
        append = arrivals.append
        now = time.time
        async for response in call:
            # Every change of a response arrives with it.
            arrived = now()
            before = counts[index]
            for change in response.changes:
                append(arrived)
                if change.change_type != created:
                    state["updated"] += 1
            counts[index] += len(response.changes)
            if before < state["target"] <= counts[index]:
                state["complete"] += 1
                if state["complete"] == streams:
                    finished.set()
            if counts[index] > state["target"]:
                state["stray"] += counts[index] - max(before, state["target"])

    tasks = [asyncio.create_task(watch(index)) for index in range(streams)]
    print("open", flush=True)
    rounds = 0
    try:
        while True:
            command = await commands.get()
            if command == "quit":
                return
            if not command.startswith("expect "):
                raise ValueError(f"unknown command {command!r}")
            rounds += 1
            counts[:] = [0] * streams
            del arrivals[:]
            state.update(target=int(command.split()[1]), complete=0, stray=0, updated=0)
            finished.clear()
            cpu = time.process_time()
            print("ready", flush=True)
            failed = [task for task in tasks if task.done()]
            try:
                async with asyncio.timeout(ROUND_TIMEOUT_SECONDS):
                    await finished.wait()
                outcome = "done"
            except TimeoutError:
                outcome = "timeout"
            await asyncio.sleep(0.05)  # a duplicate right behind the last change is seen
            path = directory / f"arrivals-{os.getpid()}-{rounds}.bin"
            with path.open("wb") as out:
                arrivals.tofile(out)
            answer = {
                "outcome": outcome,
                "path": str(path),
                "arrivals": len(arrivals),
                "complete": state["complete"],
                "stray": state["stray"],
                "updated": state["updated"],
                "ended_streams": len(failed),
                "cpu_seconds": time.process_time() - cpu,
            }
            print(json.dumps(answer), flush=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in opened:
            await channel.close(None)


# --- the bench side -----------------------------------------------------------------------


def _python_path() -> str:
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPOSITORY)]))


class _ClientProcess:
    def __init__(self, directory: Path, address: str, streams: int, channels: int, name: str):
        self.name = name
        self.log = (directory / f"{name}.log").open("w")
        self.popen = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "bench.watch_fanout",
                "client",
                address,
                str(streams),
                str(channels),
                TEST_TOKEN,
                str(directory),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=clean_environment({"PYTHONPATH": _python_path()}),
        )
        self._expect_line("open")

    def _line(self) -> str:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited: see {self.log.name}")
        return line.strip()

    def _expect_line(self, wanted: str) -> None:
        line = self._line()
        if line != wanted:
            raise RuntimeError(f"{self.name} said {line!r}, not {wanted!r}")

    def expect(self, changes: int) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(f"expect {changes}\n")
        self.popen.stdin.flush()
        self._expect_line("ready")

    def result(self) -> dict[str, object]:
        answer: dict[str, object] = json.loads(self._line())
        return answer

    def close(self) -> None:
        if self.popen.poll() is None and self.popen.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.popen.stdin.close()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self.log.close()


@dataclass
class _Round:
    delays: list[float]  # seconds, one per delivery
    gateway_cpu: float  # seconds
    client_cpu: float  # seconds, all client processes
    deliveries: int
    last: float  # seconds from the commit to the last delivery


@dataclass
class _Setup:
    """One gateway, its database and prefix, its streams' client processes."""

    name: str
    streams: int
    database_url: str
    loop: asyncio.AbstractEventLoop
    publisher: EventPublisher
    gateway_pid: int
    clients: list[_ClientProcess] = field(default_factory=list)
    next_number: int = 1

    def __post_init__(self) -> None:
        self.engine = create_engine(self.database_url)

    def _cpu(self) -> float:
        return process_cpu_seconds(self.gateway_pid)

    async def _store(self) -> tuple[float, int]:
        items = [item(n) for n in range(self.next_number, self.next_number + ITEMS)]
        self.next_number += ITEMS
        counts = await store_projects(self.engine, items, STORE_BATCH)
        committed = time.time()
        assert counts.created == ITEMS, counts
        assert counts.revision > 0, counts
        await self.publisher.publish(ProjectsChanged(counts.revision))
        return committed, counts.revision

    def round(self) -> _Round:
        for client in self.clients:
            client.expect(ITEMS)
        cpu = self._cpu()
        committed, _ = self.loop.run_until_complete(self._store())
        answers = [client.result() for client in self.clients]
        gateway_cpu = self._cpu() - cpu
        delays: list[float] = []
        for client, answer in zip(self.clients, answers, strict=True):
            if answer["outcome"] != "done" or answer["stray"] or answer["updated"]:
                raise AssertionError(f"{self.name}: {client.name} answered {answer}")
            arrivals = array.array("d")
            path = Path(str(answer["path"]))
            with path.open("rb") as source:
                arrivals.frombytes(source.read())
            path.unlink()
            delays.extend(arrival - committed for arrival in arrivals)
        if len(delays) != self.streams * ITEMS:
            raise AssertionError(
                f"{self.name}: {len(delays)} deliveries, not {self.streams * ITEMS}"
            )
        client_cpu = sum(float(str(answer["cpu_seconds"])) for answer in answers)
        return _Round(delays, gateway_cpu, client_cpu, len(delays), max(delays))

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.loop.run_until_complete(self.engine.dispose())


@contextlib.contextmanager
def _setup(
    directory: Path, loop: asyncio.AbstractEventLoop, name: str, streams: int, processes: int
) -> Iterator[_Setup]:
    directory = directory / name
    directory.mkdir()
    with redis_namespace() as (redis_url, prefix), postgres_database() as database_url:
        env = environment(
            directory,
            redis_url,
            prefix,
            database_url,
            WATCH_MAX_STREAMS_PER_CLIENT=str(max(2000, 2 * streams)),
            GATEWAY_MAX_CONCURRENT_RPCS=str(max(4096, 4 * streams)),
        )
        with gateway(directory, env) as (process, address):
            publisher = EventPublisher(
                events_url(redis_url, redis_url), prefix, Settings().dependency_timeout_seconds
            )
            setup = _Setup(name, streams, database_url, loop, publisher, process.pid)
            try:
                per_process = [
                    streams // processes + (i < streams % processes) for i in range(processes)
                ]
                for index, count in enumerate(per_process):
                    channels = min(CHANNELS_PER_CLIENT, count)
                    setup.clients.append(
                        _ClientProcess(
                            directory, address, count, channels, f"{name}-client-{index}"
                        )
                    )
                say(f"  {name}: {streams} streams from {processes} client processes")
                yield setup
            finally:
                setup.close()
                loop.run_until_complete(publisher.close())


def _summary(rounds: list[_Round]) -> dict[str, list[float]]:
    return {
        "p50_ms": [percentile(r.delays, 0.5) * 1000 for r in rounds],
        "p99_ms": [percentile(r.delays, 0.99) * 1000 for r in rounds],
        "max_ms": [r.last * 1000 for r in rounds],
        "gateway_cpu_us_per_change": [r.gateway_cpu / r.deliveries * 1e6 for r in rounds],
        "client_cpu_us_per_change": [r.client_cpu / r.deliveries * 1e6 for r in rounds],
        "gateway_cpu_s": [r.gateway_cpu for r in rounds],
    }


def _shown(round_: _Round) -> str:
    return (
        f"p50 {percentile(round_.delays, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(round_.delays, 0.99) * 1000:.0f} ms, "
        f"last {round_.last * 1000:.0f} ms, gateway CPU {round_.gateway_cpu:.2f} s "
        f"({round_.gateway_cpu / round_.deliveries * 1e6:.0f} us/change), "
        f"clients {round_.client_cpu:.2f} s"
    )


def run(options: Options) -> list[Figure]:
    streams = STREAMS // 4 if options.quick else STREAMS
    loop = asyncio.new_event_loop()
    results: dict[str, list[_Round]] = {"many": [], "one": []}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-watch-fanout-") as name,
            contextlib.ExitStack() as stack,
        ):
            say(f"watch_fanout: {ITEMS} new projects a round to {streams} streams and to 1")
            setups = {
                "many": stack.enter_context(
                    _setup(Path(name), loop, "many", streams, CLIENT_PROCESSES)
                ),
                "one": stack.enter_context(_setup(Path(name), loop, "one", 1, 1)),
            }
            for setup in setups.values():
                say(f"  warm-up {setup.name}: {_shown(setup.round())}")
            for index in range(options.runs):
                for key, setup in setups.items():
                    results[key].append(setup.round())
                    say(
                        f"  run {index + 1}/{options.runs}, {setup.streams} streams: "
                        f"{_shown(results[key][-1])}"
                    )
    finally:
        loop.close()
    many, one = _summary(results["many"]), _summary(results["one"])
    samples = {f"ours_{k}": v for k, v in many.items()} | {
        f"one_watcher_{k}": v for k, v in one.items()
    }
    deliveries = streams * ITEMS
    return [
        Figure(
            "watch_fanout_p99_ms",
            median(many["p99_ms"]),
            median(one["p99_ms"]),
            "ms",
            higher_is_better=False,
            target=500.0,
            target_on="ours",
            note=(
                f"commit to delivery, {ITEMS} new projects to {streams} WatchProjects streams on "
                f"one gateway ({deliveries:,} deliveries a run; baseline: 1 stream); "
                f"{CLIENT_PROCESSES} client processes"
            ),
            samples=samples,
        ),
        Figure(
            "watch_fanout_p50_ms",
            median(many["p50_ms"]),
            median(one["p50_ms"]),
            "ms",
            higher_is_better=False,
            note=(
                f"as watch_fanout_p99_ms; the last delivery came {median(many['max_ms']):.0f} ms "
                "after the commit (median of the runs)"
            ),
        ),
        Figure(
            "watch_fanout_cpu_per_change",
            median(many["gateway_cpu_us_per_change"]),
            median(one["gateway_cpu_us_per_change"]),
            "us CPU",
            higher_is_better=False,
            note=(
                f"gateway process CPU per delivered change, {streams} streams vs 1; the client "
                f"processes spent {median(many['client_cpu_us_per_change']):.0f} us per change"
            ),
        ),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] != ["client"] or len(sys.argv) != 7:
        sys.exit("usage: python -m bench.watch_fanout client ADDRESS STREAMS CHANNELS TOKEN DIR")
    _client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
