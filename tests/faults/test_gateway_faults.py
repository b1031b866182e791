"""Scenarios 3, 5 and 12, and the security promises: lost answers, expiry, bad input, TLS,
rate limits. Every answer is a proper status code and the gateway never falls over."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import trustme
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2
from tests.faults.ledger import Counts, Ledger, record, sample_links
from tests.faults.proxy import AnswerEatingProxy
from tests.support.processes import RedisServer, poll_until
from tests.support.stack import TEST_TOKEN, Stack, get_status, upload, wait_for_task

AUTH = (("authorization", f"Bearer {TEST_TOKEN}"),)


def stub_for(address: str) -> tuple[grpc.Channel, queue_service_pb2_grpc.QueueServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, queue_service_pb2_grpc.QueueServiceStub(channel)


def test_lost_answer_then_retry_gets_the_same_task(
    fault_stack: Callable[..., Stack], ledger_for: Callable[[Stack], Ledger]
) -> None:
    stack = fault_stack()
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=2)
    host, port = gateway.address.rsplit(":", 1)
    proxy = AnswerEatingProxy((host, int(port)))
    channel, through_proxy = stub_for(proxy.address)
    ledger = ledger_for(stack)
    lost_answers = 0
    try:
        for page in (1, 2, 3):
            request_id = f"lost-{uuid.uuid4().hex}"
            request = queue_service_pb2.UploadRequest(page=page, request_id=request_id)
            with pytest.raises(grpc.RpcError) as caught:
                through_proxy.Upload(request, metadata=AUTH, timeout=2)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            lost_answers += 1
            # The client retries (directly now) with the same request_id: the same task.
            retried = ledger.upload(gateway, page, request_id)
            assert ledger.upload(gateway, page, request_id).id == retried.id
        assert proxy.dropped_frames > 0
    finally:
        channel.close()
        proxy.close()

    # 20 clients sending one request_id at once: one task.
    request_id = f"herd-{uuid.uuid4().hex}"
    ids: list[str] = []
    barrier = threading.Barrier(20)

    def one_client() -> None:
        barrier.wait()
        ids.append(upload(gateway, 4, request_id=request_id).id)

    threads = [threading.Thread(target=one_client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(ids) == 20 and len(set(ids)) == 1, ids
    ledger.accepted[request_id], ledger.pages[request_id] = ids[0], 4

    ledger.settle(gateway, 60)
    counts = ledger.count(sample_links(stack.site.url, [1, 2, 3, 4]))
    record(
        "3. lost answer",
        f"{lost_answers} answers eaten by a proxy, each retried with its request_id (same task "
        f"id); 20 concurrent clients with one request_id -> {len(set(ids))} task",
        counts,
    )
    assert counts.lost == 0 and counts.duplicated == 0 and counts.success == 4


def test_unknown_and_expired_ids_are_not_found(fault_stack: Callable[..., Stack]) -> None:
    stack = fault_stack(RESULT_EXPIRES_SECONDS="3")
    gateway = stack.start_gateway()
    stack.start_worker(concurrency=2)
    unknown = 0
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as caught:
            get_status(gateway, str(uuid.uuid4()))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        unknown += 1
    task = upload(gateway, 1)
    assert wait_for_task(gateway, task.id).status == task_pb2.TASK_STATUS_SUCCESS
    seen: list[str] = []

    def expired() -> bool:
        try:
            status = get_status(gateway, task.id).status
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        seen.append(task_pb2.TaskStatus.Name(status))
        return False

    poll_until(expired, 15, 0.2, "the record to expire")
    assert set(seen) <= {"TASK_STATUS_SUCCESS"}, f"never PENDING on the way to expiry: {seen}"
    counts = Counts(
        accepted=1, success=1, failure=0, lost=0, duplicated=0, rows=stack.row_counts()[0]
    )
    record(
        "5. unknown and expired ids",
        f"{unknown} unknown ids -> NOT_FOUND; a finished task read {sorted(set(seen))} until its "
        "record expired (3 s), then NOT_FOUND, never PENDING",
        counts,
    )


ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
odd_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300
) | st.sampled_from(["", " ", "\x00", "../../etc/passwd", "' OR 1=1 --", "0" * 36, "\u202e"])
metadata_values = st.one_of(
    st.just(None),
    st.just(f"Bearer {TEST_TOKEN}"),
    st.just(f"bearer   {TEST_TOKEN}  "),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
    st.lists(st.just(f"Bearer {TEST_TOKEN}"), min_size=2, max_size=3),
)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_fuzzed_requests_get_proper_answers(fault_stack: Callable[..., Stack]) -> None:
    stack = fault_stack(GATEWAY_MAX_MESSAGE_BYTES="4096")
    gateway = stack.start_gateway()
    codes: dict[str, int] = {}

    def auth(value: object) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        if isinstance(value, list):
            return tuple(("authorization", v) for v in value)
        return (("authorization", str(value)),)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        page=st.integers(min_value=-(2**31), max_value=2**31 - 1)
        | st.sampled_from([0, 1, 10_000, 10_001]),
        request_id=odd_text,
        task_id=odd_text,
        authorization=metadata_values,
    )
    def fuzz(page: int, request_id: str, task_id: str, authorization: object) -> None:
        metadata = auth(authorization)
        for code in (
            code_of(
                lambda: gateway.stub.Upload(
                    queue_service_pb2.UploadRequest(page=page, request_id=request_id),
                    metadata=metadata,
                    timeout=10,
                )
            ),
            code_of(
                lambda: gateway.stub.GetStatus(
                    queue_service_pb2.GetStatusRequest(id=task_id), metadata=metadata, timeout=10
                )
            ),
        ):
            assert code in ALLOWED, code
            codes[code.name] = codes.get(code.name, 0) + 1

    fuzz()
    huge = code_of(lambda: upload(gateway, 1, request_id="x" * 10_000))
    assert huge == grpc.StatusCode.RESOURCE_EXHAUSTED
    nope = gateway.channel.unary_unary(
        "/projects.v1.QueueService/Nope", request_serializer=None, response_deserializer=None
    )
    unknown = code_of(lambda: nope(b"", timeout=5))
    assert unknown == grpc.StatusCode.UNIMPLEMENTED
    assert gateway.process.popen.poll() is None, "the gateway died"
    assert get_status_ok(gateway)
    log = gateway.process.output()
    assert TEST_TOKEN not in log, "a token reached the gateway's log"
    record(
        "12. fuzzed gateway",
        f"{sum(codes.values())} generated calls -> {dict(sorted(codes.items()))}; a 10 kB "
        "request_id -> RESOURCE_EXHAUSTED; unknown method -> UNIMPLEMENTED; gateway alive, no "
        "token in its log",
        Counts(accepted=codes.get("OK", 0), success=0, failure=0, lost=0, duplicated=0, rows=0),
    )


def get_status_ok(gateway: object) -> bool:
    task = upload(gateway, 1)  # type: ignore[arg-type]
    return bool(task.id)


def test_flood_past_the_concurrency_limit(
    fault_stack: Callable[..., Stack], own_redis: RedisServer
) -> None:
    stack = fault_stack(GATEWAY_MAX_CONCURRENT_RPCS="4")
    gateway = stack.start_gateway()
    own_redis.stop()  # every Upload now waits on the broker for seconds: calls pile up
    results: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def call() -> None:
        code = code_of(lambda: upload(gateway, 1))
        with lock:
            results.append(code)

    threads = [threading.Thread(target=call) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    tally = {code.name: results.count(code) for code in set(results)}
    assert set(results) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}, tally
    assert tally.get("RESOURCE_EXHAUSTED", 0) > 0, tally
    assert gateway.process.popen.poll() is None
    record(
        "12. flood past the concurrency limit",
        f"30 concurrent Uploads, limit 4, broker down -> {tally}",
        Counts(accepted=0, success=0, failure=0, lost=0, duplicated=0, rows=0),
    )


def test_rate_limit_answers_resource_exhausted_with_retry_info(
    fault_stack: Callable[..., Stack],
) -> None:
    stack = fault_stack(GATEWAY_RATE_LIMIT_PER_SECOND="2", GATEWAY_RATE_LIMIT_BURST="3")
    gateway = stack.start_gateway()
    codes = []
    retry_delays = []
    for _ in range(8):
        try:
            get_status(gateway, str(uuid.uuid4()))
        except grpc.RpcError as error:
            codes.append(error.code())
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                status = rpc_status.from_call(error)  # type: ignore[arg-type]
                assert status is not None
                info = error_details_pb2.RetryInfo()
                assert any(d.Unpack(info) for d in status.details)
                retry_delays.append(info.retry_delay.ToTimedelta().total_seconds())
    assert codes[:3] == [grpc.StatusCode.NOT_FOUND] * 3
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert all(0 < d <= 0.5 for d in retry_delays), retry_delays
    time.sleep(max(retry_delays))  # the RetryInfo is honest: after it, calls go through again
    assert code_of(lambda: get_status(gateway, str(uuid.uuid4()))) == grpc.StatusCode.NOT_FOUND


def test_tls_with_and_without_client_certificates(
    fault_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client.example")
    server_cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    stack = fault_stack(
        GATEWAY_TLS_CERT_FILE=str(tmp_path / "cert.pem"),
        GATEWAY_TLS_KEY_FILE=str(tmp_path / "key.pem"),
        GATEWAY_TLS_CLIENT_CA_FILE=str(tmp_path / "ca.pem"),
    )
    gateway = stack.start_gateway()
    request = queue_service_pb2.GetStatusRequest(id=str(uuid.uuid4()))

    def code_with(credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
        channel = (
            grpc.secure_channel(gateway.address, credentials)
            if credentials
            else grpc.insecure_channel(gateway.address)
        )
        with channel:
            stub = queue_service_pb2_grpc.QueueServiceStub(channel)
            return code_of(lambda: stub.GetStatus(request, metadata=AUTH, timeout=5))

    ca_pem = ca.cert_pem.bytes()
    with_client_cert = grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=client_cert.private_key_pem.bytes(),
        certificate_chain=client_cert.cert_chain_pems[0].bytes(),
    )
    assert code_with(with_client_cert) == grpc.StatusCode.NOT_FOUND  # through, and answered
    assert (
        code_with(grpc.ssl_channel_credentials(root_certificates=ca_pem))
        == grpc.StatusCode.UNAVAILABLE
    )
    assert code_with(None) == grpc.StatusCode.UNAVAILABLE  # plaintext refused
    assert "(TLS)" in gateway.process.output()
