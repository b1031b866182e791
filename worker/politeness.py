"""One budget per source host for the whole fleet of workers, kept in Redis.

Every request to a source host, robots.txt included, first takes a turn (`HostBudget.turn`):
a slot of the host's `SOURCE_MAX_CONCURRENCY`, held as a lease that expires after
`SOURCE_LEASE_SECONDS` (so a worker killed while holding one gives it back by itself), and a
place in the host's log of sends. Both are taken together by one Lua script on Redis's own
clock, so workers on hosts with different clocks share one budget and no two of them can take
the same slot. A 429 or 503 with Retry-After pauses the host's budget for everyone
(`HostBudget.pause`).

The guarantee is stated in the site's own terms (`Pace`): at most `count` requests in any
window of `window` seconds, where the window is the second a site counts in, widened by
`WINDOW_MARGIN` for the way from the sender to the site's stamp; and, with a robots.txt
Crawl-delay, at least that long between two requests. What the log holds for each request is
when it may have left at the latest: on its grant, its start plus `LATE_SEND_SECONDS` (it may
leave any time until then); once its headers are out, the moment they were, read on this
process's clock of Redis's. A new start comes a window after the count-th latest of these (a
Crawl-delay after the latest), so a request that leaves late only pushes the starts that come
a count after it, by its own lateness, instead of losing its place; the log's figures only
ever come down, so no grant made on an earlier figure can overrun a window. A request that
could not leave within its turn's allowance is not sent, and its place leaves the log.

The allowance is LATE_SEND_SECONDS on top of what the way to the site costs every request
before it can leave, whatever the machine's load: twice the error of this process's reading of
Redis's clock (a request waits for the latest the start may be on our clock and is measured
from the earliest) and the setup of a connection to the host (its handshake, last measured).
Both are known before the grant, so the log holds the allowance the request is held to; it is
capped so that a request that leaves that late, and runs for as long as a fetch may, still ends
within its slot's lease.

Starts are also paced (START_SPREAD), so that a window's count does not go out at once. A turn
is granted up to RESERVE_AHEAD_SECONDS before its start, and its request leaves at the start.
A turn waits on the process's event loop, with no database connection held; in each process
only the first waiter of a host asks Redis (the others queue behind it on an asyncio lock), so
waiting costs Redis about one call per grant, not one per waiting task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.errors import RetryableError

log = logging.getLogger(__name__)

KEY_PREFIX = "harvester.polite:"
# The window a site counts in (one second) is widened by this much: a request's way from the
# sender to the site's stamp is never quite the same for two requests (the sample site on a
# loaded machine stamped arrivals tens of ms after the send: bench/README.md), so a second of
# the site's is a window of sends this much longer. The sender's own lateness is not in it:
# the log holds when each request really left.
WINDOW_MARGIN = 0.07
# How late a request may leave after its start, beyond what its way to the site costs (the
# clock's error, a connection's setup: `HostBudget._allowance`); one that would leave later is
# not sent and asks for another turn. Until its send is known, the log counts the request as
# leaving as late as its allowance, which holds back only the start a count after it (a window
# later): so it can be far longer than a machine's usual lateness without costing the budget
# anything.
LATE_SEND_SECONDS = 0.2
# A request that leaves later than this after its start is counted as late (a worker that
# counts many is short of CPU for its concurrency); it is still sent.
NOTED_LATE_SECONDS = 0.02
CONNECT_STARTED_EVENT = "connection.connect_tcp.started"
HEADERS_SENT_EVENT = "http11.send_request_headers.started"
HEADERS_OUT_EVENT = "http11.send_request_headers.complete"
# A waiter for a concurrency slot asks again this often at most; a release in its own process
# wakes it sooner.
SLOT_POLL_SECONDS = 0.02
# The least a call to the budget in Redis waits (connecting, one command); a longer dependency
# bound (DEPENDENCY_TIMEOUT_SECONDS, for a slow link) widens it: a call cut short fails the try.
REDIS_TIMEOUT_SECONDS = 2.0
CLOCK_READING_SECONDS = 10.0
# Starts are at least this share of the window's mean spacing (window / count) apart: a
# window's count goes out over part of it, not all at once, so that their answers, and the
# parse and store of each, do not all land on a worker's loop in one moment, while the next
# starts are due. It paces; the guarantee is the window's.
START_SPREAD = 0.5
# How far before its start a turn is granted at most: enough for the wake-up of a process that
# sleeps until it, so that a start that frees is taken by a waiter already awake for it, and
# for the few round trips in which a process's waiters, one after the other, take the starts
# of a window that free together.
RESERVE_AHEAD_SECONDS = 0.03

# KEYS: sends (zset turn id -> the latest it may have left, ms on Redis's clock), leases (zset
# turn id -> expiry ms), paused until (ms), the last start granted (ms).
# ARGV: window ms, count, gap ms, concurrency, lease ms, turn id, ahead ms, late ms, spread ms.
# Returns {1, ms until the granted start, 'granted', now}, else {0, ms to wait, why, now}; ms
# as strings (Redis would cut a Lua number to an integer); now is Redis's clock, in ms.
#
# A start fits when fewer than `count` requests may have left within the window before it,
# and none within the gap: so every window that holds it holds at most `count`. It may be
# granted up to ARGV[7] ms ahead (RESERVE_AHEAD_SECONDS), and the caller sleeps until it. Its
# slot is leased from the grant: a request holds the slot from then on.
_TAKE_TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local paused = tonumber(redis.call('GET', KEYS[3]) or '0')
if paused > now then
  return {0, tostring(paused - now), 'paused', tostring(now)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {0, tostring(tonumber(first[2]) - now), 'full', tostring(now)}
end
local window, count, gap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.3f', now - window))
local start = now
if gap > 0 then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] then start = math.max(start, tonumber(last[2]) + gap) end
end
local nth = redis.call('ZRANGE', KEYS[1], -count, -count, 'WITHSCORES')
if nth[2] then start = math.max(start, tonumber(nth[2]) + window) end
local spread = tonumber(ARGV[9])
start = math.max(start, tonumber(redis.call('GET', KEYS[4]) or '0') + spread)
if start - now > tonumber(ARGV[7]) then
  return {0, tostring(start - now - tonumber(ARGV[7])), 'rate', tostring(now)}
end
local keep = math.ceil(start - now + spread) + 1000
redis.call('SET', KEYS[4], string.format('%.3f', start), 'PX', keep)
local latest = start + tonumber(ARGV[8])
redis.call('ZADD', KEYS[1], string.format('%.3f', latest), ARGV[6])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(last[2]) - now + window) + 1000)
redis.call('ZADD', KEYS[2], string.format('%.3f', start + tonumber(ARGV[5])), ARGV[6])
redis.call('PEXPIRE', KEYS[2], math.ceil(start - now + tonumber(ARGV[5])) + 1000)
return {1, tostring(start - now), 'granted', tostring(now)}
"""

# A request's headers are out: the latest it may have left comes down to when they were (it
# only ever comes down, and a place that has left the log stays out).
# KEYS: sends. ARGV: turn id, sent by (ms, Redis's clock).
_SENT = """
local latest = redis.call('ZSCORE', KEYS[1], ARGV[1])
if latest and tonumber(latest) > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
end
return 1
"""

# KEYS: paused until (ms). ARGV: pause ms. Only ever lengthens a pause.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local until_ms = now + tonumber(ARGV[1])
local paused = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > paused then
  redis.call('SET', KEYS[1], tostring(until_ms), 'PX', math.ceil(tonumber(ARGV[1])) + 1000)
end
return 1
"""


class TurnNotGiven(RetryableError):
    """The host's budget gave no turn within the time the task may wait for one."""


class LateForTurn(Exception):
    """The request was about to leave too long after its turn: it was not sent."""


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    requests_per_second: float
    concurrency: int
    lease_seconds: float
    # The longest a request runs once it has left (FETCH_TIMEOUT_SECONDS): its slot's lease
    # must outlast it, so a request may leave only that long before the lease ends.
    request_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Pace:
    """At most `count` requests in any `window` seconds, and `gap` seconds or more between two."""

    window: float
    count: int
    gap: float = 0.0


class Turn:
    """A granted turn: how long its task waited for it (time that is not the task's work), the
    check that its request leaves in time and the word to the fleet's log of when it left
    (`trace`, httpcore's trace extension)."""

    __slots__ = (
        "_connecting",
        "_on_setup",
        "_report",
        "_reporting",
        "_sent",
        "allowance",
        "due",
        "held_back",
        "late",
        "waited",
    )

    def __init__(
        self,
        due: float,
        waited: float,
        report: Callable[[float], Coroutine[None, None, None]] | None = None,
        *,
        allowance: float = LATE_SEND_SECONDS,
        on_setup: Callable[[float], None] | None = None,
    ) -> None:
        self.due = due  # the earliest its start can be, in this process's time.monotonic()
        self.waited = waited
        # How late after `due` its request may leave: what the log holds it to.
        self.allowance = allowance
        self.late = 0.0  # how long after its start its request left
        self.held_back = False  # its request was stopped before it was sent
        self._report = report
        self._reporting: asyncio.Task[None] | None = None
        self._on_setup = on_setup  # told how long the connection took to be ready, if one was made
        self._connecting: float | None = None
        self._sent = False

    async def trace(self, event: str, info: dict[str, object]) -> None:
        if event == CONNECT_STARTED_EVENT and not self._sent and self._connecting is None:
            self._connecting = time.monotonic()
        elif event == HEADERS_SENT_EVENT and not self._sent:
            now = time.monotonic()
            if self._connecting is not None and self._on_setup is not None:
                # Told before the check: a request held back by a long handshake has the next
                # turn allow for it (its connection is closed, so that turn connects again).
                self._on_setup(now - self._connecting)
            late = now - self.due
            if late > self.allowance:
                self.held_back = True
                raise LateForTurn(
                    f"the request would have left {late * 1000:.0f} ms after its start "
                    f"(it was allowed {self.allowance * 1000:.0f} ms)"
                )
            self.late = late
            self._sent = True
        elif event == HEADERS_OUT_EVENT and self._sent and self._report and not self._reporting:
            # The headers are out by now. Told beside the exchange, not before its answer: the
            # start it frees comes a window later, while the answer is awaited now.
            self._reporting = asyncio.create_task(self._report(time.monotonic()))
        # Anything else, a redirect's next hop included, rides on the same turn.

    async def reported(self) -> None:
        """Wait for the word to the log of when the request left, if one was sent."""
        if self._reporting is not None:
            await self._reporting


class RedisClock:
    """Redis's clock read in this process's time.monotonic(), from the round trips that read it.

    Redis's time of a reading lies within its round trip; taken at the middle, it is off by at
    most half the round trip. The tightest round trip wins, and a reading ages out after
    CLOCK_READING_SECONDS, so that a slow moment of the machine or a Redis restarted elsewhere is
    not believed for long.
    """

    def __init__(self) -> None:
        self._offset = 0.0  # Redis's clock minus ours
        self.error = math.inf  # seconds either way
        self._read_at = -math.inf

    @property
    def read(self) -> bool:
        return self.error < math.inf

    def observe(self, asked_at: float, answered_at: float, redis_now: float) -> None:
        error = (answered_at - asked_at) / 2
        if error <= self.error or answered_at - self._read_at > CLOCK_READING_SECONDS:
            self._offset = redis_now - (asked_at + error)
            self.error = error
            self._read_at = answered_at

    def local(self, redis_time: float) -> float:
        return redis_time - self._offset

    def remote(self, local_time: float) -> float:
        return local_time + self._offset


class HostBudget:
    """The fleet's per-host rate and concurrency, for the tasks of one worker process."""

    def __init__(self, client: aioredis.Redis, prefix: str, limits: BudgetLimits) -> None:
        self._client = client
        self._prefix = prefix + KEY_PREFIX
        self._limits = limits
        self._take_turn = client.register_script(_TAKE_TURN)
        self._pause = client.register_script(_PAUSE)
        self._sent = client.register_script(_SENT)
        self._clock = RedisClock()
        self._lines: dict[str, asyncio.Lock] = {}
        self._released: dict[str, asyncio.Event] = {}
        self._setup: dict[str, float] = {}  # the last connection's setup to each host, seconds

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str,
        limits: BudgetLimits,
        *,
        dependency_timeout: float = REDIS_TIMEOUT_SECONDS,
    ) -> HostBudget:
        timeout = max(REDIS_TIMEOUT_SECONDS, dependency_timeout)
        client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, prefix, limits)

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client, which the fleet's robots.txt cache shares."""
        return self._client

    async def close(self) -> None:
        await self._client.aclose()

    def _keys(self, host: str) -> list[str]:
        base = f"{self._prefix}{host}:"
        return [base + "sends", base + "leases", base + "paused", base + "last"]

    def pace(self, crawl_delay: float | None = None) -> Pace:
        """The requests a host may have: the rate's whole part in any second (or one in each
        1 / rate seconds, below one a second), the window widened by its margin; and the
        Crawl-delay between two requests, if there is one."""
        rate = self._limits.requests_per_second
        count = max(math.floor(rate), 1)
        window = (1.0 + WINDOW_MARGIN) * max(1.0, 1.0 / rate)
        return Pace(window, count, crawl_delay or 0.0)

    @contextlib.asynccontextmanager
    async def turn(
        self, host: str, *, crawl_delay: float | None = None, max_wait: float | None = None
    ) -> AsyncIterator[Turn]:
        """Wait for a turn on `host` (at most `max_wait` s: then TurnNotGiven), hold it while
        the block runs, and give its slot back after."""
        lease_id = uuid.uuid4().hex
        started = time.monotonic()
        pace = self.pace(crawl_delay)
        try:
            async with asyncio.timeout(max_wait):
                start_at, due, allowance = await self._reserve(host, lease_id, pace)
                # Not before the start Redis gave, measured from after its answer came back.
                await asyncio.sleep(max(start_at - time.monotonic(), 0.0))
        except TimeoutError as exc:
            await self._release(host, lease_id, unsent=True)  # if it was granted meanwhile
            raise TurnNotGiven(
                f"no turn on {host} within {max_wait:g} s (SOURCE_MAX_REQUESTS_PER_SECOND, "
                "SOURCE_MAX_CONCURRENCY): the fleet has more pages in flight than it may fetch"
            ) from exc
        except BaseException:
            await self._release(host, lease_id, unsent=True)
            raise

        async def report(sent_at: float) -> None:
            await self._report_sent(host, lease_id, sent_at)

        def on_setup(seconds: float) -> None:
            self._setup[host] = seconds

        turn = Turn(due, time.monotonic() - started, report, allowance=allowance, on_setup=on_setup)
        try:
            yield turn
        finally:
            await turn.reported()
            # A request held back gives its place back too: it never reached the site.
            await self._release(host, lease_id, unsent=turn.held_back)

    def _allowance(self, host: str) -> float:
        """How late after its due time a request on `host` may leave: LATE_SEND_SECONDS, and
        what every request pays before it can leave. It waits until the latest its start may
        be on our clock and is measured from the earliest (twice the clock's error); and it may
        have to set up a connection (as long as the last one to the host took; until one is
        measured, a round trip to Redis, the handshake's one round trip, stands in)."""
        error = self._clock.error
        setup = self._setup.get(host, 2 * error)
        # Past this, a request leaving late would still run when its slot's lease (taken at
        # the grant, up to RESERVE_AHEAD_SECONDS before its start) ran out, and the slot could
        # be granted again: one more request in flight than SOURCE_MAX_CONCURRENCY.
        limits = self._limits
        latest = limits.lease_seconds - RESERVE_AHEAD_SECONDS - limits.request_seconds
        return max(0.0, min(LATE_SEND_SECONDS + setup + 2 * error, latest))

    async def _read_clock(self, host: str) -> None:
        """Read Redis's clock on its own, once per process: the first grant needs the clock's
        error to say its allowance; each grant's answer reads the clock again after that."""
        try:
            asked_at = time.monotonic()
            seconds, micros = await self._client.time()
            answered_at = time.monotonic()
        except (RedisError, OSError) as exc:
            raise _budget_unreachable(host, exc) from exc
        self._clock.observe(asked_at, answered_at, seconds + micros / 1_000_000)

    async def _reserve(self, host: str, lease_id: str, pace: Pace) -> tuple[float, float, float]:
        """A granted start on `host`, in this process's time.monotonic(): when the request may
        leave (no earlier than Redis's start), when it is due (no later than it), and how late
        after that it may leave (what the log holds it to)."""
        line = self._lines.setdefault(host, asyncio.Lock())
        released = self._released.setdefault(host, asyncio.Event())
        async with line:  # FIFO: the process's waiters for a host queue here; one asks Redis
            while True:
                if not self._clock.read:
                    await self._read_clock(host)
                # Said before the answer's reading: the log holds the request to this one.
                allowance = self._allowance(host)
                asked_at = time.monotonic()
                granted, wait, why, redis_now = await self._ask(host, lease_id, pace, allowance)
                answered_at = time.monotonic()
                self._clock.observe(asked_at, answered_at, redis_now)
                if granted:
                    start = self._clock.local(redis_now + wait)
                    error = self._clock.error
                    return start + error, start - error, allowance
                if why == "full":
                    # A slot frees when a request ends, which Redis cannot tell us.
                    released.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(wait, SLOT_POLL_SECONDS)):
                            await released.wait()
                else:
                    await asyncio.sleep(wait)

    async def _ask(
        self, host: str, lease_id: str, pace: Pace, allowance: float
    ) -> tuple[bool, float, str, float]:
        """(granted, seconds to wait, why, Redis's clock in seconds); a grant enters its request
        in the log as leaving `allowance` after its start at the latest."""
        limits = self._limits
        args: list[float | int | str] = [
            pace.window * 1000.0,
            pace.count,
            pace.gap * 1000.0,
            limits.concurrency,
            limits.lease_seconds * 1000.0,
            lease_id,
            RESERVE_AHEAD_SECONDS * 1000.0,
            allowance * 1000.0,
            START_SPREAD * pace.window / pace.count * 1000.0,
        ]
        try:
            raw = await self._take_turn(keys=self._keys(host), args=args)
        except (RedisError, OSError) as exc:
            raise _budget_unreachable(host, exc) from exc
        granted, wait_ms, why, now_ms = int(raw[0]), float(raw[1]), _text(raw[2]), float(raw[3])
        return bool(granted), max(wait_ms, 0.0) / 1000.0, why, now_ms / 1000.0

    async def _report_sent(self, host: str, lease_id: str, sent_at: float) -> None:
        """Bring the latest the turn's request may have left down to `sent_at` (this
        process's time.monotonic()), read on Redis's clock at its latest."""
        sent_by = self._clock.remote(sent_at) + self._clock.error
        try:
            await self._sent(keys=self._keys(host)[:1], args=[lease_id, f"{sent_by * 1000:.3f}"])
        except (RedisError, OSError) as exc:
            # It stays in the log as leaving as late as it may have: a later start, no overrun.
            log.warning("could not tell the fleet when a request to %s left: %s", host, exc)

    async def _release(self, host: str, lease_id: str, *, unsent: bool = False) -> None:
        """Give the turn's slot back; and its place in the log, when its request was never sent
        (taking a place out never puts more than the count into a window)."""
        sends, leases, *_ = self._keys(host)
        try:
            if unsent:
                async with self._client.pipeline(transaction=True) as both:
                    both.zrem(leases, lease_id)
                    both.zrem(sends, lease_id)
                    await both.execute()
            else:
                await self._client.zrem(leases, lease_id)
        except (RedisError, OSError) as exc:
            log.warning("could not give back a slot on %s (it expires by itself): %s", host, exc)
        self._released.setdefault(host, asyncio.Event()).set()

    async def pause(self, host: str, seconds: float) -> None:
        """Stop the whole fleet's requests to `host` for `seconds` (a pause only lengthens)."""
        if seconds <= 0:
            return
        try:
            await self._pause(keys=[self._keys(host)[2]], args=[seconds * 1000.0])
        except (RedisError, OSError) as exc:
            log.warning("could not pause the fleet's requests to %s: %s", host, exc)
        else:
            log.info("the fleet pauses its requests to %s for %.1f s (Retry-After)", host, seconds)


def _budget_unreachable(host: str, exc: BaseException) -> RetryableError:
    # Without the shared budget no request may go out: the fleet would overrun the site.
    return RetryableError(f"the fleet's budget for {host} in Redis is unreachable: {exc}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
