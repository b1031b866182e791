"""OpenTelemetry: one trace from an Upload through its publish, each try of its task, the fetch
and the store, exported by gateway and worker over OTLP/HTTP to a receiver in the test."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from projects.v1 import task_pb2
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import poll_until
from tests.support.stack import Stack, upload, wait_for_task

RUN = "run/projects.v1.harvest_page"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


def _status(span: ReceivedSpan) -> int:
    # The httpx instrumentation names it by the semantic conventions in force (new or old).
    attributes = span.attributes
    return int(attributes.get("http.response.status_code", attributes.get("http.status_code", 0)))


def test_one_trace_links_upload_publish_each_try_fetch_and_store(
    redis_stack: Stack, receiver: OtlpReceiver
) -> None:
    redis_stack.env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_TRACES_SAMPLER="always_on",
        OTEL_BSP_SCHEDULE_DELAY="100",  # ms: export soon, not every 5 s
        LOG_FORMAT="json",
    )
    gateway = redis_stack.start_gateway()
    worker = redis_stack.start_worker()
    redis_stack.site.script(6, [{"status": 503}])  # the first try fails, the retry succeeds
    task = upload(gateway, 6)
    done = wait_for_task(gateway, task.id)
    assert done.status == task_pb2.TASK_STATUS_SUCCESS

    def whole_trace() -> list[ReceivedSpan] | None:
        spans = receiver.received()
        uploads = [s for s in spans if s.name.endswith("QueueService/Upload")]
        if len(uploads) != 1:
            return None
        trace = [s for s in spans if s.trace_id == uploads[0].trace_id]
        names = [s.name for s in trace]
        stored = [s for s in trace if s.name == "store projects"]
        return trace if names.count(RUN) == 2 and stored else None

    trace = poll_until(whole_trace, 30, 0.1, what="the Upload's whole trace")
    by_id = {span.span_id: span for span in trace}
    (upload_span,) = [s for s in trace if s.name.endswith("QueueService/Upload")]
    assert upload_span.service == "harvester-gateway"
    (publish,) = [s for s in trace if s.name == "publish projects.v1.harvest_page"]
    assert publish.parent_id == upload_span.span_id
    assert publish.attributes["harvester.page"] == 6

    tries = sorted((s for s in trace if s.name == RUN), key=lambda s: s.attributes["harvester.try"])
    assert [s.attributes["harvester.try"] for s in tries] == [1, 2]
    assert all(
        s.service == "harvester-worker" and s.attributes["harvester.page"] == 6 for s in tries
    )
    assert tries[0].parent_id == publish.span_id

    def under(span: ReceivedSpan, ancestor: ReceivedSpan) -> bool:
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            if span.span_id == ancestor.span_id:
                return True
        return False

    # The retry's message was sent by the first try, so the second try descends from it.
    assert under(tries[1], tries[0])
    # The listing's GETs: the first try also read the site's robots.txt (a 404: no rules).
    fetches = [
        s for s in trace if s.name == "GET" and "/robots.txt" not in str(s.attributes["http.url"])
    ]
    assert sorted(_status(s) for s in fetches) == [200, 503], fetches
    # The 503 under the first try, the 200 under the second.
    failed, fetched = sorted(fetches, key=_status, reverse=True)
    assert under(failed, tries[0])
    assert under(fetched, tries[1])
    assert not under(fetched, failed)
    (store,) = [s for s in trace if s.name == "store projects"]
    assert under(store, tries[1])
    assert store.attributes["harvester.projects.created"] == done.result.created > 0
    assert store.attributes["harvester.projects.updated"] == done.result.updated
    statements = [s for s in trace if under(s, store) and "db.system" in s.attributes]
    assert {s.attributes["db.system"] for s in statements} == {"sqlite"}, statements

    # The worker's log line of the harvest names the trace and the try's span.
    logged = [
        json.loads(line)
        for line in worker.output().splitlines()
        if line.startswith("{") and '"page 6: found' in line
    ]
    assert [(line["trace_id"], line["span_id"]) for line in logged] == [
        (upload_span.trace_id, tries[1].span_id)
    ]


def test_traces_exporter_none_and_sdk_disabled_turn_tracing_off_despite_an_endpoint(
    redis_stack: Stack, receiver: OtlpReceiver
) -> None:
    redis_stack.env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_TRACES_SAMPLER="always_on",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    # Each process under a service name of its own, so a span says which one exported it.
    turned_off = [
        redis_stack.start_gateway(
            "gateway-none", OTEL_SERVICE_NAME="gateway-none", OTEL_TRACES_EXPORTER="none"
        ),
        redis_stack.start_gateway(
            "gateway-disabled", OTEL_SERVICE_NAME="gateway-disabled", OTEL_SDK_DISABLED="true"
        ),
    ]
    traced = redis_stack.start_gateway("gateway-on", OTEL_SERVICE_NAME="gateway-on")
    worker = redis_stack.start_worker(OTEL_SERVICE_NAME="worker-disabled", OTEL_SDK_DISABLED="TRUE")
    for page, gateway in enumerate([*turned_off, traced], start=1):
        done = wait_for_task(gateway, upload(gateway, page).id)
        assert done.status == task_pb2.TASK_STATUS_SUCCESS

    # The one process left on exports its Upload: the receiver works and the endpoint is right.
    poll_until(
        lambda: any(s.name.endswith("QueueService/Upload") for s in receiver.received()),
        30,
        0.1,
        what="the traced gateway's Upload span",
    )
    # A stopped process has exported all it had (its shutdown flushes), so nothing can come late.
    for process in [gateway.process for gateway in turned_off] + [worker]:
        assert process.stop() == 0, process.output()
    assert {span.service for span in receiver.received()} == {"gateway-on"}
