"""robots.txt: fetched once per host per `ROBOTS_TTL_SECONDS` for the whole fleet, obeyed.

The fetched answer is kept in Redis, so one worker fetches it and every worker reads it; a
process also keeps the parsed rules until the Redis copy expires. While one worker fetches, the
others wait for its copy (a short lock in Redis) rather than fetching it too. It is parsed by
Protego, Scrapy's parser: the standard library's `urllib.robotparser` knows neither the `*` and
`$` patterns nor RFC 9309's longest-match rule, so it reads some real files wrong.

RFC 9309, section 2.3.1: a 2xx is parsed (its first 500 KiB); a 4xx means there are no rules
(everything allowed); a 5xx, a failed connection or a timeout means everything is disallowed
until it can be read, which we try again after `unreachable_ttl` (shorter than the TTL), and
meanwhile the host's pages retry later instead of failing. A redirect is followed only on the
source's own origin (the HTTP client's rule); one elsewhere counts as unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from protego import Protego
from redis.exceptions import RedisError

from worker.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

KEY_PREFIX = "harvester.robots:"
# RFC 9309 asks parsers to read at least 500 KiB; the rest of a larger file is ignored.
MAX_ROBOTS_BYTES = 500 * 1024
# How long the worker fetching a host's robots.txt holds the others off before they fetch it.
FETCH_LOCK_SECONDS = 30.0
WAIT_POLL_SECONDS = 0.05
LONGEST_UNREACHABLE_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class RobotsAnswer:
    """What the host answered for /robots.txt: a status (0: unreachable) and the body."""

    status: int
    body: str = ""
    reason: str = ""


class RobotsDisallowed(PermanentError):
    """robots.txt disallows the page for our agent: it is not fetched."""


class RobotsUnreachable(RetryableError):
    """robots.txt could not be read (5xx, unreachable): RFC 9309 says fetch nothing meanwhile."""


@dataclass(frozen=True, slots=True)
class RobotsRules:
    answer: RobotsAnswer
    expires_at: float  # time.time()
    parsed: Protego | None  # None: no rules (4xx) or none readable (5xx, unreachable)

    @classmethod
    def from_answer(cls, answer: RobotsAnswer, expires_at: float) -> RobotsRules:
        parsed = Protego.parse(answer.body) if 200 <= answer.status < 300 else None
        return cls(answer, expires_at, parsed)

    @property
    def unreachable(self) -> bool:
        return not 200 <= self.answer.status < 500

    def check(self, url: str, path: str, agent: str) -> None:
        """Raise unless `agent` may fetch `url` (whose path and query are `path`)."""
        if self.unreachable:
            what = f"answered {self.answer.status}" if self.answer.status else "could not be read"
            raise RobotsUnreachable(
                f"robots.txt {what} ({self.answer.reason or 'no reason given'}): RFC 9309 "
                f"disallows every page until it can be read",
                retry_after=max(self.expires_at - time.time(), 0.0),
            )
        if self.parsed is not None and not self.parsed.can_fetch(url, agent):
            raise RobotsDisallowed(f"robots.txt disallows {path} for {agent}")

    def crawl_delay(self, agent: str) -> float | None:
        return None if self.parsed is None else self.parsed.crawl_delay(agent)


def robots_agent(user_agent: str) -> str:
    """The product token robots.txt's User-agent lines name: `projects-harvester` of
    `projects-harvester/0.1.0 (+https://...)`."""
    return user_agent.split("/", 1)[0].split(maxsplit=1)[0].strip()


class RobotsCache:
    """The fleet's robots.txt of each host, read through Redis."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, ttl: float, fetch: RobotsFetcher
    ) -> None:
        self._client = client
        self._prefix = prefix + KEY_PREFIX
        self._ttl = ttl
        self._unreachable_ttl = min(ttl / 10.0, LONGEST_UNREACHABLE_SECONDS)
        self._fetch = fetch
        self._local: dict[str, RobotsRules] = {}
        self._fetching: dict[str, asyncio.Lock] = {}

    async def rules(self, origin: str) -> RobotsRules:
        """The rules of `origin` (scheme://host:port), from this process, Redis or the host."""
        local = self._local.get(origin)
        if local is not None and local.expires_at > time.time():
            return local
        # One task of a process goes to Redis (and maybe the host); the rest wait for it.
        async with self._fetching.setdefault(origin, asyncio.Lock()):
            local = self._local.get(origin)
            if local is not None and local.expires_at > time.time():
                return local
            rules = await self._shared(origin)
            self._local[origin] = rules
            return rules

    async def _shared(self, origin: str) -> RobotsRules:
        key = self._prefix + origin
        lock = key + ":fetching"
        try:
            while True:
                cached = await self._client.get(key)
                if cached is not None:
                    return _decode(cached)
                if await self._client.set(lock, "1", nx=True, px=int(FETCH_LOCK_SECONDS * 1000)):
                    break
                await asyncio.sleep(WAIT_POLL_SECONDS)  # another worker is fetching it
        except (RedisError, OSError) as exc:
            raise RetryableError(f"robots.txt of {origin} cannot be shared: Redis: {exc}") from exc
        try:
            answer = await self._fetch(origin + "/robots.txt")
            ttl = self._unreachable_ttl if not 200 <= answer.status < 500 else self._ttl
            rules = RobotsRules.from_answer(answer, time.time() + ttl)
            log.info("robots.txt of %s: %s, kept %g s", origin, answer.status or "unreachable", ttl)
            await self._client.set(key, _encode(rules), px=max(int(ttl * 1000), 1))
            return rules
        except (RedisError, OSError) as exc:
            raise RetryableError(f"robots.txt of {origin} cannot be shared: Redis: {exc}") from exc
        finally:
            with contextlib.suppress(RedisError, OSError):  # else it expires by itself
                await self._client.delete(lock)


RobotsFetcher = Callable[[str], Awaitable[RobotsAnswer]]


def _encode(rules: RobotsRules) -> str:
    answer = rules.answer
    return json.dumps(
        {
            "status": answer.status,
            "body": answer.body,
            "reason": answer.reason,
            "expires_at": rules.expires_at,
        }
    )


def _decode(raw: bytes | str) -> RobotsRules:
    data = json.loads(raw)
    answer = RobotsAnswer(int(data["status"]), str(data["body"]), str(data.get("reason", "")))
    return RobotsRules.from_answer(answer, float(data["expires_at"]))
