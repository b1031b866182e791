"""Build the gateway's gRPC server on an address, and serve it until SIGTERM.

`build_gateway` wires settings into a server and returns it with its bound port (tests bind
port 0), touching neither the database nor the broker; `Gateway.start` opens the port at once
and comes up when the database answers (`gateway.startup`); `serve` only adds signals, the
start-up banner and the orderly shutdown: health to NOT_SERVING, drain in-flight calls, then
close the broker and database clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from core import tracing
from core.celery_config import make_celery
from core.db import create_engine
from core.events import EventPublisher, events_url, listen
from core.gc_tuning import freeze_long_lived_objects
from core.migrate import migrate
from core.settings import ApiToken, Settings, generate_token
from gateway import metrics as gateway_metrics
from gateway.auth import BearerAuthInterceptor, TokenTable
from gateway.batches import BatchRecords
from gateway.celery_queue import CeleryQueue, PublishingCelery
from gateway.contract import HEALTH_SERVICE_NAME, PROJECT_SERVICE_NAME, QUEUE_SERVICE_NAME
from gateway.errors import StoreUnavailable
from gateway.health import DependencyHealth
from gateway.issuing import Issuer
from gateway.project_service import ProjectService
from gateway.project_store import ProjectStore
from gateway.ratelimit import RateLimiter
from gateway.reconciler import Reconciler
from gateway.records import TaskRecords
from gateway.reflection import enable_reflection
from gateway.service import BatchLimits, QueueService
from gateway.startup import StartingGate, Startup
from gateway.tokens import TokenSigner
from gateway.watching import EventHub, ProjectFeed
from projects.v1 import project_service_pb2_grpc, queue_service_pb2_grpc

log = logging.getLogger(__name__)

PURGE_INTERVAL_SECONDS = 600.0
KEEPALIVE_TIMEOUT_MS = 10_000
BACKGROUND_STOP_SECONDS = 2.0
MIN_CLIENT_PING_INTERVAL_MS = 10_000


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    health: DependencyHealth
    records: TaskRecords
    queue: CeleryQueue
    service: QueueService
    projects: ProjectService
    feed: ProjectFeed
    hub: EventHub
    engine: AsyncEngine
    purge_interval: float
    reconciler: Reconciler | None
    startup: Startup
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    coming_up: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve now (NOT_SERVING, calls UNAVAILABLE); come up when the database answers."""
        # Before the port opens, so no probe ever sees SERVING unchecked.
        await self.health.mark_down("starting")
        await self.server.start()
        self.coming_up = asyncio.create_task(self._come_up(), name="start-up")

    async def _come_up(self) -> None:
        await self.startup.run()
        await self.health.check_now()
        self.health.start()
        self._background.append(asyncio.create_task(self.hub.run(), name="events"))
        self._background.append(asyncio.create_task(self.feed.run(), name="project-feed"))
        self._background.append(asyncio.create_task(self._purge_loop(), name="purge-records"))
        if self.reconciler is not None:
            self._background.append(
                asyncio.create_task(self.reconciler.run_forever(), name="reconcile")
            )

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.purge_interval)
            with contextlib.suppress(StoreUnavailable):
                purged = await self.records.purge_expired()
                if purged:
                    log.info("purged %d expired task records", purged)

    async def stop(self, grace: float) -> None:
        if self.coming_up is not None and not self.coming_up.done():
            self.coming_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.coming_up
        await self.health.shutdown()
        # Streams never end by themselves: each is told to end, with the way to resume.
        self.projects.stop_streams()
        self.service.stop_streams()
        await self.server.stop(grace)
        await self.service.drain()
        for task in self._background:
            task.cancel()
        # Ended before the clients they use are closed under them, but not waited for without
        # end: a Redis client cut off while it connects may not notice its cancel at once.
        stuck: set[asyncio.Task[None]] = set()
        if self._background:  # none yet when it stops while it waits for its database
            _, stuck = await asyncio.wait(self._background, timeout=BACKGROUND_STOP_SECONDS)
        if stuck:
            log.warning("stopping without waiting for: %s", ", ".join(t.get_name() for t in stuck))
        self.queue.close()
        await self.engine.dispose()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured (client certificates when a CA is)."""
    if settings.gateway_tls_cert_file is None or settings.gateway_tls_key_file is None:
        return None
    key = settings.gateway_tls_key_file.read_bytes()
    chain = settings.gateway_tls_cert_file.read_bytes()
    client_ca = settings.gateway_tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


async def build_gateway(settings: Settings, tokens: list[ApiToken]) -> Gateway:
    tracing.configure(settings, "harvester-gateway")
    bound = settings.dependency_timeout_seconds
    # Every step bounded (a free connection, a connect, each statement): a database that
    # stops answering fails the call within the bound instead of holding it.
    engine = create_engine(
        settings.resolved_database_url,
        pool_timeout=bound,
        connect_timeout=bound,
        statement_timeout=bound,
    )
    # May start the embedded Redis, which waits for it: keep that off the event loop.
    app = await asyncio.to_thread(make_celery, settings, "gateway", PublishingCelery)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    dependencies = DependencyHealth(
        health_servicer, settings.broker_check_interval_seconds, probe_timeout=bound
    )
    queue = CeleryQueue(
        app,
        settings.publish_timeout_seconds,
        bound,
        on_unavailable=dependencies.mark_down,
    )
    lifetime = dt.timedelta(seconds=settings.result_expires_seconds)
    records = TaskRecords(engine, lifetime, on_unavailable=dependencies.mark_down)
    dependencies.watch([queue.ping, records.ping])
    store = ProjectStore(engine, on_unavailable=dependencies.mark_down)
    # Its key and deployment come from the database, at start-up.
    signer = TokenSigner()
    events = events_url(app.conf.broker_url, app.conf.result_backend)
    hub = EventHub(lambda: listen(events, settings.redis_key_prefix))
    feed = ProjectFeed(
        store,
        hub.project_wakeups,
        settings.watch_poll_interval_seconds,
        settings.watch_buffer_changes,
    )
    projects = ProjectService(
        store, feed, signer, max_streams_per_client=settings.watch_max_streams_per_client
    )

    async def prepare() -> None:
        """What must hold before a handler runs: the schema, the key, the feed's head."""
        await migrate(settings.resolved_database_url, connect_timeout=bound)
        deployment, stored_key = await store.deployment()
        signer.bind((settings.token_signing_key or stored_key).encode(), deployment)
        await feed.prime()

    startup = Startup(prepare)
    server = grpc.aio.server(
        interceptors=[
            # Outermost, so that a call's span holds all the rest (and an Upload's publish).
            *tracing.grpc_server_interceptors(),
            # Before auth, so calls refused by the auth interceptor are counted too.
            *gateway_metrics.interceptors(settings.gateway_metrics_address is not None),
            BearerAuthInterceptor(
                TokenTable(tokens),
                RateLimiter(
                    settings.gateway_rate_limit_per_second, settings.gateway_rate_limit_burst
                ),
            ),
            # Inside authentication: a bad token is UNAUTHENTICATED even while starting.
            StartingGate(startup),
        ],
        options=[
            ("grpc.max_receive_message_length", settings.gateway_max_message_bytes),
            # Off unless asked for (GATEWAY_PROCESSES asks): a second gateway started by mistake
            # on a port in use then fails to start instead of quietly taking half the calls.
            ("grpc.so_reuseport", int(settings.gateway_reuse_port)),
            # Quiet connections (an idle watch stream) are pinged, so proxies keep them and a
            # peer that vanished is noticed; clients may ping as often as every 10 s.
            ("grpc.keepalive_time_ms", int(settings.gateway_keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ],
        maximum_concurrent_rpcs=settings.gateway_max_concurrent_rpcs,
    )
    service = QueueService(
        records,
        queue,
        Issuer(records, queue),
        max_page=settings.max_page,
        lifetime_seconds=settings.result_expires_seconds,
        publish_timeout=settings.publish_timeout_seconds,
        batches=BatchRecords(engine, lifetime, on_unavailable=dependencies.mark_down),
        batch_limits=BatchLimits(settings.max_batch_pages, settings.until_known_window),
        hub=hub,
        events=EventPublisher(
            events, settings.redis_key_prefix, settings.dependency_timeout_seconds
        ),
        signer=signer,
        poll_interval=settings.watch_poll_interval_seconds,
    )
    queue_service_pb2_grpc.add_QueueServiceServicer_to_server(service, server)
    project_service_pb2_grpc.add_ProjectServiceServicer_to_server(projects, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((QUEUE_SERVICE_NAME, PROJECT_SERVICE_NAME, HEALTH_SERVICE_NAME), server)
    credentials = server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.gateway_address)
    else:
        port = server.add_secure_port(settings.gateway_address, credentials)
    return Gateway(
        server=server,
        port=port,
        health=dependencies,
        records=records,
        queue=queue,
        service=service,
        projects=projects,
        feed=feed,
        hub=hub,
        engine=engine,
        purge_interval=min(PURGE_INTERVAL_SECONDS, settings.result_expires_seconds),
        reconciler=Reconciler(
            records,
            queue,
            settings.task_queue,
            dt.timedelta(seconds=settings.reconcile_after_seconds),
            settings.reconcile_interval_seconds,
        )
        if settings.reconcile_after_seconds > 0
        else None,
        startup=startup,
    )


def banner(address: str, token: str, tls: bool) -> str:
    transport = "-cacert <your CA file>" if tls else "-plaintext"
    return (
        "No API_TOKENS set: this run's token (client name 'default') is\n"
        f"    {token}\n"
        "Try:\n"
        f"    grpcurl {transport} -H 'authorization: Bearer {token}' -d '{{\"page\": 1}}' "
        f"{address} {QUEUE_SERVICE_NAME}/Upload\n"
    )


async def serve(settings: Settings) -> None:
    tokens = list(settings.api_tokens)
    generated = None
    if not tokens:
        generated = generate_token()
        tokens = [ApiToken(name="default", token=generated)]
    # Before the port opens: a SIGTERM right after "listening" must drain, not kill.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    gateway = await build_gateway(settings, tokens)
    await gateway.start()
    assert gateway.coming_up is not None
    metrics = (
        gateway_metrics.serve_gateway_metrics(
            settings.gateway_metrics_address, lambda: gateway.health.serving
        )
        if settings.gateway_metrics_address is not None
        else None
    )
    freeze_long_lived_objects()
    host = settings.gateway_address.rpartition(":")[0]
    address = f"{host}:{gateway.port}"
    log.info(
        "gateway listening on %s (%s)",
        address,
        "TLS" if settings.gateway_tls_cert_file else "plaintext",
    )
    if generated is not None:
        # Printed once on stdout for the person who started it; never logged.
        tls = settings.gateway_tls_cert_file is not None
        print(banner(address, generated, tls), flush=True)
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait((stop, gateway.coming_up), return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    failure = gateway.coming_up.exception() if gateway.coming_up.done() else None
    if failure is not None:
        # What waiting does not cure (a wrong password, a failed migration): stop, and say so.
        log.error("gateway cannot start; stopping")
        await gateway.stop(0)
        raise failure
    await stopping.wait()
    log.info("stopping: draining in-flight calls for up to %.1f s", settings.gateway_grace_seconds)
    await gateway.stop(settings.gateway_grace_seconds)
    if metrics is not None:
        metrics.close()
    tracing.shutdown()
    log.info("gateway stopped")
