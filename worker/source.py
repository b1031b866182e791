"""The source, fetched politely: robots.txt first, then a turn of the fleet's budget, then the GET.

This is the one way the worker talks to the source: `worker.fetch` does the HTTP exchange,
`worker.robots` says what may be fetched, `worker.politeness` when. A 429 or 503 that says when
to come back (Retry-After) pauses the host for the whole fleet, then fails this try as before.

Waiting for a turn is not the task's work: the time spent waiting is taken off the clock of the
task's soft time limit (`limit`), and the wait is bounded by `max_wait` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from worker import metrics
from worker.errors import RetryableError
from worker.fetch import FetchedPage, FetchLimits, Validators, fetch_page, fetch_robots
from worker.politeness import NOTED_LATE_SECONDS, HostBudget, LateForTurn
from worker.robots import RobotsAnswer, RobotsCache, RobotsFetcher, robots_agent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    user_agent: str
    retry_after_cap: float


class PoliteSource:
    def __init__(
        self,
        http: httpx.AsyncClient,
        limits: FetchLimits,
        budget: HostBudget,
        robots: RobotsCache | None,
        policy: SourcePolicy,
    ) -> None:
        self._http = http
        self._limits = limits
        self._budget = budget
        self._robots = robots
        self._policy = policy
        self.agent = robots_agent(policy.user_agent)
        # Requests that could not leave on time for their turn: sent late, or (too late) not
        # sent. A worker that counts many is short of CPU for its concurrency.
        self.late_sends = 0
        self.late_turns = 0

    async def fetch(
        self,
        url: str,
        validators: Validators | None = None,
        *,
        limit: asyncio.Timeout | None = None,
        max_wait: float | None = None,
    ) -> FetchedPage:
        parsed = httpx.URL(url)
        host = parsed.netloc.decode()
        crawl_delay = None
        if self._robots is not None:
            with _off_the_clock(limit):
                rules = await self._robots.rules(f"{parsed.scheme}://{host}")
            rules.check(url, parsed.raw_path.decode(), self.agent)
            crawl_delay = rules.crawl_delay(self.agent)
        while True:
            async with contextlib.AsyncExitStack() as held:
                with _off_the_clock(limit):
                    turn = await held.enter_async_context(
                        self._budget.turn(host, crawl_delay=crawl_delay, max_wait=max_wait)
                    )
                # The exchange only: the wait for the turn is not the fetch's time.
                started, sent = time.perf_counter(), True
                try:
                    return await fetch_page(self._http, url, self._limits, validators, turn.trace)
                except LateForTurn as exc:
                    # Stopped before its headers left: the source saw nothing, so no fetch to
                    # time (on a loaded machine these outnumber some pages' real fetches).
                    sent = False
                    self.late_turns += 1
                    log.debug("%s not sent: %s; asking for another turn", url, exc)
                except RetryableError as exc:
                    if exc.retry_after is not None:  # a 429 or 503 (or 408) said when to return
                        cap = self._policy.retry_after_cap
                        await self._budget.pause(host, min(exc.retry_after, cap))
                    raise
                finally:
                    if sent:
                        metrics.FETCH_SECONDS.observe(time.perf_counter() - started)
                    self.late_sends += turn.late > NOTED_LATE_SECONDS


def robots_fetcher(
    http: httpx.AsyncClient, limits: FetchLimits, budget: HostBudget
) -> RobotsFetcher:
    """GET a robots.txt in a turn of its host's budget, like any request to the source."""

    async def fetch(url: str) -> RobotsAnswer:
        while True:
            async with budget.turn(httpx.URL(url).netloc.decode()) as turn:
                try:
                    return await fetch_robots(http, url, limits, turn.trace)
                except LateForTurn:
                    continue  # not sent; ask again

    return fetch


@contextlib.contextmanager
def _off_the_clock(limit: asyncio.Timeout | None) -> Iterator[None]:
    """Stop `limit`'s clock for the block: the time spent in it is added to its deadline.

    A limit that has expired already (its deadline passed while the loop was busy elsewhere,
    the cancel it sent not yet seen) is left as it is: asyncio refuses to reschedule an
    expiring Timeout, and the cancel it sent ends the task at its next await anyway."""
    when = None if limit is None else limit.when()
    if limit is None or when is None or limit.expired():
        yield
        return
    loop = asyncio.get_running_loop()
    left = when - loop.time()
    limit.reschedule(None)
    try:
        yield
    finally:
        limit.reschedule(loop.time() + left)
