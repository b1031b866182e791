"""`python -m bench.noop_gateway ADDRESS [--grouped]`: a grpc.aio QueueService.Upload that does
nothing.

The floor of `upload_per_s`: what Python gRPC answers on this machine when an Upload costs
nothing but gRPC itself (the same request, metadata and size of answer as the real gateway, no
token check, no record, no publish). The bench runs it as one process and as many processes on
one port (SO_REUSEPORT) as the gateway serves with, and drives both with the same clients as the
gateway, so the gap is what our own work costs, and the better latency of the two is the least
a Python gateway could offer at 32 calls in flight.

With `--grouped`, Upload still does nothing, but waits the way the gateway's does: each call is
submitted to a `core.batching.Batcher` (as `gateway/issuing.py` submits its Uploads), whose flush
hands the group to one thread and back (as the gateway's group goes to its publish thread) and
does nothing there. Against the plain no-op it is what that shape alone costs under grpc.aio,
before any record or message is made.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

from core.batching import Batcher
from core.db import utcnow
from projects.v1 import queue_service_pb2, queue_service_pb2_grpc, task_pb2


class _NoOpQueueService(queue_service_pb2_grpc.QueueServiceServicer):
    async def Upload(
        self,
        request: queue_service_pb2.UploadRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.UploadRequest, queue_service_pb2.UploadResponse
        ],
    ) -> queue_service_pb2.UploadResponse:
        task = task_pb2.Task(
            id=str(uuid.uuid4()), page=request.page, status=task_pb2.TASK_STATUS_PENDING
        )
        task.enqueue_time.FromDatetime(utcnow())
        return queue_service_pb2.UploadResponse(task=task)

    async def GetStatus(
        self,
        request: queue_service_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.GetStatusRequest, queue_service_pb2.GetStatusResponse
        ],
    ) -> queue_service_pb2.GetStatusResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the no-op gateway only takes Uploads")


def _nothing(size: int) -> None:
    return None


class _GroupedNoOpQueueService(_NoOpQueueService):
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="noop-publish")
        self._groups: Batcher[int] = Batcher(self._flush, 256)

    async def _flush(self, pages: list[int]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, _nothing, len(pages))

    async def Upload(
        self,
        request: queue_service_pb2.UploadRequest,
        context: grpc.aio.ServicerContext[
            queue_service_pb2.UploadRequest, queue_service_pb2.UploadResponse
        ],
    ) -> queue_service_pb2.UploadResponse:
        await self._groups.submit(request.page)
        return await super().Upload(request, context)


async def _serve(address: str, grouped: bool) -> None:
    # Several of these processes share one port, as the gateway's own serving processes do.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    # The RPCs it leaves out answer UNIMPLEMENTED, from the generated base class.
    servicer = (_GroupedNoOpQueueService if grouped else _NoOpQueueService)()  # type: ignore[abstract]
    queue_service_pb2_grpc.add_QueueServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    print(f"no-op gateway listening on {address.rpartition(':')[0]}:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], "--grouped" in sys.argv[2:]))
