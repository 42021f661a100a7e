"""The HTTP app's part: the ``/metrics`` route and a server span per REST request.

``/metrics`` is an ordinary route behind the one HTTP guard (Host, Origin, token); its counts
span every principal's tasks, so ``TaskService.task_counts`` admits admins only. MCP's paths
get no HTTP span: the MCP SDK makes a server span per message, and a session's handlers run in
the session's own task, so a span of the request that opened the session would wrongly parent
every later call of that session.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opspawn_mcp.principals import principal_of
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
