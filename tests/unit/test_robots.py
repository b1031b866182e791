"""worker.robots.RobotsRules: what each robots.txt answer allows (RFC 9309), and the agent."""

from __future__ import annotations

import time

import pytest

from core.settings import DEFAULT_USER_AGENT
from worker.robots import (
    RobotsAnswer,
    RobotsDisallowed,
    RobotsRules,
    RobotsUnreachable,
    robots_agent,
)

SITE = "https://site.test"
AGENT = "projects-harvester"
FILE = """
User-agent: *
Disallow: /

User-agent: projects-harvester
Crawl-delay: 2.5
Disallow: /projects?page=2$
Disallow: /*.pdf$
Allow: /private/open
Disallow: /private
"""


def rules(status: int, body: str = "", ttl: float = 60.0) -> RobotsRules:
    return RobotsRules.from_answer(RobotsAnswer(status, body), time.time() + ttl)


def allowed(read: RobotsRules, path: str, agent: str = AGENT) -> bool:
    try:
        read.check(SITE + path, path, agent)
    except RobotsDisallowed:
        return False
    return True


def test_the_agent_is_the_user_agents_product_token() -> None:
    assert robots_agent(DEFAULT_USER_AGENT) == AGENT
    assert robots_agent("MyBot (+https://x.test)") == "MyBot"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/projects?page=1", True),
        ("/projects?page=2", False),  # `$` ends the pattern: page=20 is another page
        ("/projects?page=20", True),
        ("/files/report.pdf", False),  # `*` within a pattern
        ("/files/report.pdf?x=1", True),
        ("/private/open/a", True),  # the longest match wins, whatever the order
        ("/private/closed", False),
    ],
)
def test_our_group_is_obeyed_with_wildcards_and_the_longest_match(
    path: str, expected: bool
) -> None:
    assert allowed(rules(200, FILE), path) is expected


def test_another_agent_falls_to_the_star_group() -> None:
    assert not allowed(rules(200, FILE), "/projects?page=1", agent="otherbot")


def test_a_disallowed_page_says_which_path_for_which_agent() -> None:
    with pytest.raises(RobotsDisallowed) as caught:
        rules(200, FILE).check(SITE + "/projects?page=2", "/projects?page=2", AGENT)
    assert str(caught.value) == "robots.txt disallows /projects?page=2 for projects-harvester"


def test_crawl_delay_is_our_groups() -> None:
    assert rules(200, FILE).crawl_delay(AGENT) == 2.5
    assert rules(200, FILE).crawl_delay("otherbot") is None
    assert rules(404).crawl_delay(AGENT) is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
def test_a_4xx_means_no_rules(status: int) -> None:
    assert allowed(rules(status, "User-agent: *\nDisallow: /"), "/anything")


@pytest.mark.parametrize("status", [500, 503, 0])
def test_a_5xx_or_no_answer_disallows_everything_until_it_expires(status: int) -> None:
    read = rules(status, ttl=30.0)
    with pytest.raises(RobotsUnreachable, match="RFC 9309") as caught:
        read.check(SITE + "/projects?page=1", "/projects?page=1", AGENT)
    assert caught.value.retry_after is not None and 29.0 < caught.value.retry_after <= 30.0


def test_an_empty_or_garbled_file_allows_everything() -> None:
    assert allowed(rules(200, ""), "/projects?page=1")
    assert allowed(rules(200, "<html>not a robots file</html>"), "/projects?page=1")
