"""The HTTP app's part: the ``/metrics`` route, a server span per REST request, and the small
guarded HTTP server an ``opspawn-mcp worker`` may run for its own ``/metrics``.

See docs/operations.md, "Metrics" and "Traces".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import uvicorn
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opspawn_mcp.config import Config
from opspawn_mcp.http_guard import HttpGuard
from opspawn_mcp.principals import Principals, principal_of
from opspawn_mcp.telemetry import metrics, tracing

if TYPE_CHECKING:
    from opspawn_mcp.service import TaskService

METRICS_PATH = "/metrics"


def metrics_route(service: TaskService) -> Route:
    """``GET /metrics``: the Prometheus text exposition (``telemetry.metrics``)."""

    async def scrape(request: Request) -> Response:
        counts = await service.task_counts(by=principal_of(request.scope))
        return Response(metrics.exposition(counts), media_type=CONTENT_TYPE_LATEST)

    return Route(METRICS_PATH, scrape, methods=["GET"], name="metrics")


@asynccontextmanager
async def worker_metrics(config: Config, service: TaskService) -> AsyncIterator[str | None]:
    """Serve ``/metrics`` on ``opspawn.telemetry.worker_metrics_port`` inside the block (the
    counters of a worker process live only there), on ``opspawn.server.host`` behind the same
    guard and bind rule as ``serve``; yields its base URL, or None when no port is set."""
    port = config.opspawn.telemetry.worker_metrics_port
    if port is None:
        yield None
        return
    from gateway.problems import EXCEPTION_HANDLERS
    from opspawn_mcp.runtime import bind_http, check_bind

    settings = config.opspawn.server
    principals = Principals.from_config(config)
    check_bind(settings.host, principals)
    sock = bind_http(settings.host, port)
    bound: int = sock.getsockname()[1]
    guard = HttpGuard.for_server(
        principals,
        settings.host,
        bound,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
    )
    app = Starlette(
        routes=[metrics_route(service)], middleware=guard.middleware(), exception_handlers=EXCEPTION_HANDLERS
    )
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, log_config=None)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="opspawn-worker-metrics")
    try:
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        yield f"http://{shown}:{bound}"
    finally:
        server.should_exit = True
        await serving
        sock.close()


class TracedRequests:
    """ASGI middleware: a server span per HTTP request, except on the ``untraced`` paths (path
    prefixes), whose parent is the caller's W3C ``traceparent`` header when it sends one. Add it
    only while tracing is on (``Runtime.http_app`` does)."""

    def __init__(self, app: ASGIApp, untraced: Collection[str] = ()) -> None:
        self.app = app
        self.untraced = tuple(untraced)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(self.untraced):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        attributes = {"http.request.method": method, "url.path": path}
        context = tracing.incoming(headers)
        with tracing.span(
            f"{method} {path}", kind=SpanKind.SERVER, context=context, attributes=attributes
        ) as span:
            await self.app(scope, receive, send_noting_status)
            if span is not None:
                route = scope.get("route")
                template = getattr(route, "path", None)
                if isinstance(template, str):
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
