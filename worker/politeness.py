"""One budget per source host for the whole fleet of workers, kept in Redis.

Every request to a source host, robots.txt included, first takes a turn (`HostBudget.turn`):
a slot of the host's `SOURCE_MAX_CONCURRENCY`, held as a lease that expires after
`SOURCE_LEASE_SECONDS` (so a worker killed while holding one gives it back by itself), and a
start in the host's log of starts. Both are taken together by one Lua script on Redis's own
clock, so workers on hosts with different clocks share one budget and no two of them can take
the same slot. A 429 or 503 with Retry-After pauses the host's budget for everyone
(`HostBudget.pause`).

The guarantee is stated in the site's own terms (`Pace`): at most `count` starts in any window
of `window` seconds, where the window is the second a site counts in, widened by
`WINDOW_MARGIN` for the way from a start to the site's stamp; and, with a robots.txt
Crawl-delay, at least that long between two starts. The log (a sorted set of the starts of the
last window) lets a request that leaves late keep its place: its start moves to the moment it
really leaves whenever the windows still hold with it there, and when they would not, the
request is not sent and its start is taken out of the log, so its slot is free for the next
grant instead of lost. A turn is granted up to RESERVE_AHEAD_SECONDS before its start, and its
request leaves at the start. A turn waits on the process's event loop, with no database
connection held; in each process only the first waiter of a host asks Redis (the others queue
behind it on an asyncio lock), so waiting costs Redis about one call per grant, not one per
waiting task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from worker.errors import RetryableError

log = logging.getLogger(__name__)

KEY_PREFIX = "harvester.polite:"
# The window a site counts in (one second) is widened by this much: a request's way from its
# start to the site's stamp is never quite the same for two requests, so a window of the
# site's is a window of starts this much longer. Of the margin, LATE_SEND_SECONDS is the
# sender's; the rest is for the way and for the site's own clock (the sample site on a loaded
# machine stamped arrivals well after the send: bench/README.md).
WINDOW_MARGIN = 0.07
# A request that would leave later than this after its start is not sent as that start: it
# moves its start to the moment it leaves if the windows hold with it there (and is sent), and
# otherwise gives its start back and asks for another turn. Together with the site's own
# jitter it has to fit in the margin above. (The start is taken at its earliest, the time
# before the round trip to Redis that granted it.)
LATE_SEND_SECONDS = 0.02
HEADERS_SENT_EVENT = "http11.send_request_headers.started"
# A waiter for a concurrency slot asks again this often at most; a release in its own process
# wakes it sooner.
SLOT_POLL_SECONDS = 0.02
REDIS_TIMEOUT_SECONDS = 2.0
CLOCK_READING_SECONDS = 10.0
# How far before its start a turn is granted at most: enough for the wake-up of a process that
# sleeps until it, and short, so that the log rarely holds a start that is not yet due when a
# late request asks to move its own.
RESERVE_AHEAD_SECONDS = 0.01

# Shared by the scripts below. `fits(starts, t, window, count, gap)`: whether a start at t,
# added to `starts` (ascending, ms), keeps at most `count` starts in every window of `window` ms
# and `gap` ms or more between neighbours. Only windows that hold t can change; the fullest of
# them begins at t or at an earlier start.
_FITS = """
local function fits(starts, t, window, count, gap)
  for _, s in ipairs(starts) do
    if math.abs(s - t) < gap then return false end
  end
  local lefts = {t}
  for _, s in ipairs(starts) do
    if s > t - window and s <= t then table.insert(lefts, s) end
  end
  for _, x in ipairs(lefts) do
    local n = 1
    for _, s in ipairs(starts) do
      if s >= x and s < x + window then n = n + 1 end
    end
    if n > count then return false end
  end
  return true
end
local function read_starts(key, now, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.3f', now - window))
  local raw = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local starts = {}
  for i = 2, #raw, 2 do table.insert(starts, tonumber(raw[i])) end
  return starts
end
local function keep_start(key, id, start, now, window)
  redis.call('ZADD', key, string.format('%.3f', start), id)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', key, math.ceil(tonumber(last[2]) - now + window) + 1000)
end
"""

# KEYS: starts (zset turn id -> start ms, Redis clock), leases (zset turn id -> expiry ms),
# paused until (ms). ARGV: window ms, count, gap ms, concurrency, lease ms, turn id, ahead ms.
# Returns {1, ms until the granted start, 'granted', now}, else {0, ms to wait, why, now}; ms
# as strings (Redis would cut a Lua number to an integer); now is Redis's clock, in ms.
#
# The start is the earliest one after every start in the log that fits: a window after the
# count-th last start, a gap after the last. It may be granted up to ARGV[7] ms ahead
# (RESERVE_AHEAD_SECONDS), and the caller sleeps until it; so a start that frees is taken by
# someone already waiting for it, instead of by whoever asks first after it has come. Its slot
# is leased from the grant: a request holds the slot from then on.
_TAKE_TURN = (
    _FITS
    + """
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
local starts = read_starts(KEYS[1], now, window)
local start = now
if #starts > 0 then start = math.max(start, starts[#starts] + gap) end
if #starts >= count then start = math.max(start, starts[#starts - count + 1] + window) end
if start - now > tonumber(ARGV[7]) then
  return {0, tostring(start - now - tonumber(ARGV[7])), 'rate', tostring(now)}
end
keep_start(KEYS[1], ARGV[6], start, now, window)
redis.call('ZADD', KEYS[2], string.format('%.3f', start + tonumber(ARGV[5])), ARGV[6])
redis.call('PEXPIRE', KEYS[2], math.ceil(start - now + tonumber(ARGV[5])) + 1000)
return {1, tostring(start - now), 'granted', tostring(now)}
"""
)

# A granted turn whose request could not leave on time: its start moves to now if the log
# still fits with it there (it is then sent), and is taken out of the log otherwise (it is not
# sent, and its place is free for the next grant). Taking a start out never breaks a window.
# A turn whose lease has run out is not sent either.
# KEYS: starts, leases. ARGV: window ms, count, gap ms, lease ms, turn id.
# Returns {1 (moved) or 0, now}.
_MOVE_TO_NOW = (
    _FITS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window, count, gap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[5])
local held = redis.call('ZSCORE', KEYS[2], ARGV[5])
if not held or tonumber(held) <= now then
  return {0, tostring(now)}
end
if not fits(read_starts(KEYS[1], now, window), now, window, count, gap) then
  return {0, tostring(now)}
end
keep_start(KEYS[1], ARGV[5], now, now, window)
redis.call('ZADD', KEYS[2], string.format('%.3f', now + tonumber(ARGV[4])), ARGV[5])
return {1, tostring(now)}
"""
)

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


@dataclass(frozen=True, slots=True)
class Pace:
    """At most `count` starts in any `window` seconds, and `gap` seconds or more between two."""

    window: float
    count: int
    gap: float = 0.0


class Turn:
    """A granted turn: how long its task waited for it (time that is not the task's work), and
    the check that its request leaves in time (`trace`, httpcore's trace extension)."""

    __slots__ = ("_move", "_sent", "due", "held_back", "moved", "waited")

    def __init__(
        self, due: float, waited: float, move: Callable[[], Awaitable[float | None]] | None = None
    ) -> None:
        self.due = due  # the earliest its start can be, in this process's time.monotonic()
        self.waited = waited
        self.moved = False
        self.held_back = False  # its request was stopped before it was sent
        self._move = move
        self._sent = False

    async def trace(self, event: str, info: dict[str, object]) -> None:
        if event != HEADERS_SENT_EVENT or self._sent:
            return  # a redirect's next hop rides on the same turn
        late = time.monotonic() - self.due
        if late > LATE_SEND_SECONDS and self._move is not None and not self.moved:
            moved_to = await self._move()
            if moved_to is not None:
                self.moved = True
                self.due = moved_to
                late = time.monotonic() - self.due
        if late > LATE_SEND_SECONDS:
            self.held_back = True
            raise LateForTurn(f"the request would have left {late * 1000:.0f} ms after its start")
        self._sent = True


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

    def observe(self, asked_at: float, answered_at: float, redis_now: float) -> None:
        error = (answered_at - asked_at) / 2
        if error <= self.error or answered_at - self._read_at > CLOCK_READING_SECONDS:
            self._offset = redis_now - (asked_at + error)
            self.error = error
            self._read_at = answered_at

    def local(self, redis_time: float) -> float:
        return redis_time - self._offset


class HostBudget:
    """The fleet's per-host rate and concurrency, for the tasks of one worker process."""

    def __init__(self, client: aioredis.Redis, prefix: str, limits: BudgetLimits) -> None:
        self._client = client
        self._prefix = prefix + KEY_PREFIX
        self._limits = limits
        self._take_turn = client.register_script(_TAKE_TURN)
        self._pause = client.register_script(_PAUSE)
        self._move = client.register_script(_MOVE_TO_NOW)
        self._clock = RedisClock()
        self._lines: dict[str, asyncio.Lock] = {}
        self._released: dict[str, asyncio.Event] = {}

    @classmethod
    def from_url(cls, url: str, prefix: str, limits: BudgetLimits) -> HostBudget:
        client = aioredis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
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
        return [base + "starts", base + "leases", base + "paused"]

    def pace(self, crawl_delay: float | None = None) -> Pace:
        """The starts a host may have: the rate's whole part in any second (or one in each
        1 / rate seconds, below one a second), the window widened by its margin; and the
        Crawl-delay between two starts, if there is one."""
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
                start_at, due = await self._reserve(host, lease_id, pace)
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

        async def move() -> float | None:
            return await self._move_to_now(host, lease_id, pace)

        turn = Turn(due, time.monotonic() - started, move)
        try:
            yield turn
        finally:
            # A request held back gives its start back too: it never reached the site.
            await self._release(host, lease_id, unsent=turn.held_back)

    async def _reserve(self, host: str, lease_id: str, pace: Pace) -> tuple[float, float]:
        """A granted start on `host`, in this process's time.monotonic(): when the request may
        leave (no earlier than Redis's start) and when it is due (no later than it)."""
        line = self._lines.setdefault(host, asyncio.Lock())
        released = self._released.setdefault(host, asyncio.Event())
        async with line:  # FIFO: the process's waiters for a host queue here; one asks Redis
            while True:
                asked_at = time.monotonic()
                granted, wait, why, redis_now = await self._ask(host, lease_id, pace)
                answered_at = time.monotonic()
                self._clock.observe(asked_at, answered_at, redis_now)
                if granted:
                    start = self._clock.local(redis_now + wait)
                    error = self._clock.error
                    return start + error, start - error
                if why == "full":
                    # A slot frees when a request ends, which Redis cannot tell us.
                    released.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(wait, SLOT_POLL_SECONDS)):
                            await released.wait()
                else:
                    await asyncio.sleep(wait)

    async def _ask(self, host: str, lease_id: str, pace: Pace) -> tuple[bool, float, str, float]:
        """(granted, seconds to wait, why, Redis's clock in seconds)."""
        limits = self._limits
        args: list[float | int | str] = [
            pace.window * 1000.0,
            pace.count,
            pace.gap * 1000.0,
            limits.concurrency,
            limits.lease_seconds * 1000.0,
            lease_id,
            RESERVE_AHEAD_SECONDS * 1000.0,
        ]
        try:
            raw = await self._take_turn(keys=self._keys(host), args=args)
        except (RedisError, OSError) as exc:
            # Without the shared budget no request may go out: the fleet would overrun the site.
            raise RetryableError(
                f"the fleet's budget for {host} in Redis is unreachable: {exc}"
            ) from exc
        granted, wait_ms, why, now_ms = int(raw[0]), float(raw[1]), _text(raw[2]), float(raw[3])
        return bool(granted), max(wait_ms, 0.0) / 1000.0, why, now_ms / 1000.0

    async def _move_to_now(self, host: str, lease_id: str, pace: Pace) -> float | None:
        """Move a granted turn's start to now if the host's windows hold with it there; when it
        moved, the new start in this process's time.monotonic() (at its earliest), else None
        (and the start is out of the log)."""
        args: list[float | int | str] = [
            pace.window * 1000.0,
            pace.count,
            pace.gap * 1000.0,
            self._limits.lease_seconds * 1000.0,
            lease_id,
        ]
        asked_at = time.monotonic()
        try:
            raw = await self._move(keys=self._keys(host)[:2], args=args)
        except (RedisError, OSError):
            return None  # then the request is not sent, as if the turn could not move
        answered_at = time.monotonic()
        redis_now = float(raw[1]) / 1000.0
        self._clock.observe(asked_at, answered_at, redis_now)
        if not int(raw[0]):
            return None
        return self._clock.local(redis_now) - self._clock.error

    async def _release(self, host: str, lease_id: str, *, unsent: bool = False) -> None:
        """Give the turn's slot back; and its start, when its request was never sent (taking
        a start out of the log never puts more than the count into a window)."""
        starts, leases, _ = self._keys(host)
        try:
            if unsent:
                async with self._client.pipeline(transaction=True) as both:
                    both.zrem(leases, lease_id)
                    both.zrem(starts, lease_id)
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
