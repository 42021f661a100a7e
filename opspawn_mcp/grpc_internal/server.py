"""Running the gRPC door: the task servicer, standard health checking and server reflection.

``serve_grpc`` owns the server's lifetime; health follows ``TaskService.ready()``.
See docs/grpc.md, "Authentication" and "In-process".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opspawn_mcp.errors import OpspawnError
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc
from opspawn_mcp.grpc_internal.interceptors import HEALTH_PREFIX, BearerInterceptor, TracedGrpc
from opspawn_mcp.grpc_internal.task_servicer import TaskServicer
from opspawn_mcp.principals import Principals
from opspawn_mcp.service import TaskService
from opspawn_mcp.telemetry import tracing

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TaskService"].full_name
READINESS_INTERVAL_S = 5.0
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class GrpcServer:
    """A running gRPC server; ``port`` is the bound one (useful when 0 was asked for)."""

    server: grpc.aio.Server
    host: str
    port: int

    @property
    def target(self) -> str:
        return f"{_host(self.host)}:{self.port}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _refresh_health(service: TaskService, servicer: Any) -> None:
    status = health_pb2.HealthCheckResponse
    try:
        await service.ready()
        state = status.SERVING
    except OpspawnError:
        state = status.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, state)


async def _follow_readiness(service: TaskService, servicer: Any, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await _refresh_health(service, servicer)


@contextlib.asynccontextmanager
async def serve_grpc(
    service: TaskService,
    host: str,
    port: int,
    principals: Principals,
    *,
    readiness_interval_s: float = READINESS_INTERVAL_S,
) -> AsyncIterator[GrpcServer]:
    """Serve ``opspawn.v1.TaskService`` plus health and reflection on ``host:port`` until the
    ``async with`` block ends; the health status is refreshed every ``readiness_interval_s``."""
    interceptors = [BearerInterceptor(principals)] if principals.auth_required else []
    if tracing.enabled():
        interceptors.insert(0, TracedGrpc(HEALTH_PREFIX))
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_TaskServiceServicer_to_server(TaskServicer(service, principals), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{_host(host)}:{port}")
    await _refresh_health(service, health_servicer)  # a status exists before the first call
    await server.start()
    readiness = asyncio.create_task(
        _follow_readiness(service, health_servicer, readiness_interval_s), name="grpc-readiness"
    )
    log.info("gRPC TaskService on %s:%s", host, bound)
    try:
        yield GrpcServer(server, host, bound)
    finally:
        readiness.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await readiness
        await health_servicer.enter_graceful_shutdown()
        await server.stop(STOP_GRACE_S)
