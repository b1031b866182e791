"""The peer a user would pick instead for this job: a Scrapy spider, as `harvest_vs_scrapy` runs it.

    python -m bench.scrapy_peer SOURCE_URL DATABASE_URL FIRST LAST

One process crawls pages FIRST..LAST of `SOURCE_URL` (a `{page}` template) with the default
profile's CSS selectors through parsel (Scrapy's selectors, lxml and cssselect underneath), reads
the fields by the same rules as ours (`worker.parse`'s link, date and whitespace functions), and
stores them with a pipeline that upserts each 100 items as one batch (`worker.store`'s upsert)
into the same PostgreSQL, on Scrapy's asyncio reactor. `bench/harvest.py` starts 2 of these
processes, one per core, splitting the pages. At the end it prints one JSON line: the time of its
first request and of its last commit.

Bench-only: Scrapy is not a dependency of the service (`pip install scrapy` for the bench).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import scrapy
from scrapy.crawler import CrawlerProcess
from scrapy.http import Response
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bench import data
from core.db import create_engine
from worker.parse import ProjectItem, collapse_whitespace, read_start_date, resolve_link
from worker.store import store_projects

BATCH = 100
# As many requests in flight as one of our worker processes has tasks (WORKER_CONCURRENCY).
CONCURRENCY = 32


def _text(selection: Any) -> str:
    """The text below the first selected element, every text node in document order."""
    return "".join(selection.xpath(".//text()").getall())


class ListingSpider(scrapy.Spider):
    name = "listing"

    def __init__(self, source_url: str, first: int, last: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source_url = source_url
        self.pages = range(first, last + 1)
        self.started = 0.0

    async def start(self) -> Any:
        self.started = time.time()
        for page in self.pages:
            yield scrapy.Request(self.source_url.format(page=page), callback=self.parse)

    def parse(self, response: Response, **_: Any) -> Any:
        profile = data.PROFILE
        for item in response.css(profile.item):
            title = collapse_whitespace(_text(item.css(profile.title)[:1]))
            url = resolve_link(item.css(profile.link)[:1].attrib.get("href"), response.url)
            if not title or url is None:
                continue
            start = item.css(profile.start)[:1]
            classes = (item.attrib.get("class") or "").split()
            yield {
                "item": ProjectItem(
                    url=url,
                    title=title,
                    description=collapse_whitespace(_text(item.css(profile.description)[:1])),
                    is_active=profile.active_class in classes,
                    start_date=read_start_date(
                        start.attrib.get("datetime") if start else None,
                        _text(start),
                        profile.start_text_format,
                    )
                    if start
                    else None,
                )
            }


class UpsertPipeline:
    """Each BATCH items upserted as one batch, the rest when the spider closes."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self.database_url = crawler.settings["HARVEST_DATABASE_URL"]
        self.pending: list[ProjectItem] = []
        self.stored = 0
        self.last_commit = 0.0

    @classmethod
    def from_crawler(cls, crawler: Any) -> UpsertPipeline:
        return cls(crawler)

    def open_spider(self) -> None:
        self.engine = create_engine(self.database_url, pool_size=2, pre_ping=False)

    async def process_item(self, item: dict[str, ProjectItem]) -> Any:
        self.pending.append(item["item"])
        if len(self.pending) >= BATCH:
            await self._flush()
        return item

    async def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        for attempt in range(1, 21):
            try:
                await store_projects(self.engine, batch, BATCH)
                break
            except (DBAPIError, PoolTimeout, OSError):
                # A PostgreSQL shared with others' tests runs out of connections at times; a
                # user's pipeline would retry too (as our worker's task does).
                if attempt == 20:
                    raise
                await asyncio.sleep(0.5)
        self.stored += len(batch)
        self.last_commit = time.time()

    async def close_spider(self) -> None:
        spider: ListingSpider = self.crawler.spider
        await self._flush()
        await self.engine.dispose()
        print(
            json.dumps(
                {"started": spider.started, "finished": self.last_commit, "stored": self.stored}
            ),
            flush=True,
        )


def main(argv: list[str]) -> None:
    source_url, database_url, first, last = argv[0], argv[1], int(argv[2]), int(argv[3])
    process = CrawlerProcess(
        {
            "TWISTED_REACTOR": "twisted.internet.asyncioreactor.AsyncioSelectorReactor",
            "CONCURRENT_REQUESTS": CONCURRENCY,
            "CONCURRENT_REQUESTS_PER_DOMAIN": CONCURRENCY,
            "ROBOTSTXT_OBEY": False,
            "TELNETCONSOLE_ENABLED": False,
            "LOG_LEVEL": "WARNING",
            "ITEM_PIPELINES": {"bench.scrapy_peer.UpsertPipeline": 100},
            "HARVEST_DATABASE_URL": database_url,
        }
    )
    process.crawl(ListingSpider, source_url=source_url, first=first, last=last)
    process.start()


if __name__ == "__main__":
    main(sys.argv[1:])
