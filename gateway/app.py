"""The REST gateway: plain-HTTP routes over ``TaskService``, nothing more.

Each handler turns a request into one service call and back; the HTTP guard has already decided
who the caller is. See docs/rest.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.openapi import build_openapi
from gateway.problems import EXCEPTION_HANDLERS, error_document, problem_response
from opspawn_mcp.errors import PROBLEM_MEDIA_TYPE, Door, InvalidInput, OpspawnError, PayloadTooLarge
from opspawn_mcp.http_guard import HttpGuard
from opspawn_mcp.idempotency import HEADER as IDEMPOTENCY_HEADER
from opspawn_mcp.models import TaskEvent
from opspawn_mcp.principals import principal_of
from opspawn_mcp.service import TaskService

# A spec is at most two 20k-char texts plus small fields; even fully \u-escaped that is under
# 1 MiB, so anything larger is refused before it is read into memory.
MAX_BODY_BYTES = 1024 * 1024


def _json(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _int_or_raw(value: str | None) -> int | str | None:
    """Turn a query value into an int when it is one; otherwise hand the raw text to the service,
    which refuses it with its own message, so the allowed range is stated in one place only."""
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isascii() and text.lstrip("-").isdigit() and len(text) < 20 else value


def _page_query(request: Request, *names: str) -> dict[str, Any]:
    """A list's query: the ``names`` given, ``cursor``, and ``limit`` when sent (the service's default otherwise)."""
    query = request.query_params
    kwargs: dict[str, Any] = {name: query.get(name) for name in (*names, "cursor")}
    if "limit" in query:
        kwargs["limit"] = _int_or_raw(query["limit"])
    return kwargs


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``:
    from ``Content-Length`` before reading anything, or while streaming a chunked body."""
    too_large = PayloadTooLarge(f"The request body is larger than {limit} bytes.", limit=limit)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


SSE_HEARTBEAT_S = 15.0
"""A stream gets an SSE comment this often, so proxies and load balancers with idle timeouts
(often 30-60 s) do not cut a task that is busy in one long tool call."""

SseMessage = dict[str, str]
"""One SSE message as ``sse_starlette`` takes it: ``event``, ``data`` and optionally ``id``."""


def _keepalive() -> ServerSentEvent:
    return ServerSentEvent(comment="keepalive", sep="\n")


def event_source(
    messages: AsyncGenerator[SseMessage, None], heartbeat_s: float, door: Door = Door.REST
) -> EventSourceResponse:
    """Stream ``messages`` with a ``: keepalive`` comment every ``heartbeat_s`` (sse-starlette's ping).

    A failure after the 200 went out can no longer change the status, so an ``OpspawnError``
    raised by ``messages`` is sent as a final ``problem`` event carrying the same problem JSON
    (worded for ``door``). The dashboard streams its timeline through here too.
    """

    async def framed() -> AsyncGenerator[SseMessage, None]:
        async with contextlib.aclosing(messages):
            try:
                async for message in messages:
                    yield message
            except OpspawnError as exc:
                yield {"event": "problem", "data": json.dumps(error_document(exc, door))}

    return EventSourceResponse(framed(), ping=heartbeat_s, sep="\n", ping_message_factory=_keepalive)


async def _event_messages(events: AsyncGenerator[TaskEvent, None]) -> AsyncGenerator[SseMessage, None]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield {"id": str(event.seq), "event": event.kind, "data": event.model_dump_json()}


_MALFORMED = object()


def _malformed() -> Response:
    return problem_response(400, "malformed_json", "The request body is not valid JSON.")


@dataclass(frozen=True)
class _Routes:
    """The handlers, bound to one service."""

    service: TaskService
    max_body_bytes: int
    openapi: dict[str, Any]
    sse_heartbeat_s: float

    async def _body(self, request: Request) -> Any:
        """The JSON body, or ``_MALFORMED`` for one that is not JSON (answered 400 ``malformed_json``)."""
        body = await read_body(request, self.max_body_bytes)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            return _MALFORMED

    async def submit(self, request: Request) -> Response:
        spec = await self._body(request)
        if spec is _MALFORMED:
            return _malformed()
        key = request.headers.get(IDEMPOTENCY_HEADER)
        task = await self.service.submit(spec, by=principal_of(request.scope), idempotency_key=key)
        location = request.url_for("get_task", task_id=task.id).path
        return _json(task.model_dump_json(), 202, {"Location": location})

    async def list_tasks(self, request: Request) -> Response:
        kwargs = _page_query(request, "status", "goal_contains")
        page = await self.service.list_tasks(**kwargs, by=principal_of(request.scope))
        return _json(page.model_dump_json())

    async def get(self, request: Request) -> Response:
        task = await self.service.get(request.path_params["task_id"], by=principal_of(request.scope))
        return _json(task.model_dump_json())

    async def cancel(self, request: Request) -> Response:
        task = await self.service.cancel(request.path_params["task_id"], by=principal_of(request.scope))
        return _json(task.model_dump_json())

    async def answer(self, request: Request) -> Response:
        """The body is ``ApprovalInput``: the request it answers and the answer, checked by the service."""
        fields = await self._body(request)
        if fields is _MALFORMED:
            return _malformed()
        if not isinstance(fields, dict):
            raise InvalidInput(
                'The body must be a JSON object: {"request_id": "<approval.id>", "approve": true, "note": "..."}.'
            )
        request_id = fields.pop("request_id", None)
        by = principal_of(request.scope)
        task = await self.service.answer(request.path_params["task_id"], request_id, fields, by=by)
        return _json(task.model_dump_json())

    async def events(self, request: Request) -> Response:
        """SSE of the task's events until it ends; ``Last-Event-ID`` (sent by EventSource on
        reconnect) resumes after the last event the client saw."""
        task_id = request.path_params["task_id"]
        by = principal_of(request.scope)
        raw = request.headers.get("last-event-id", request.query_params.get("after_seq"))
        after = _int_or_raw(raw) if raw is not None else 0
        # Checked before the 200 is sent, so an unknown task or bad seq gets a real 404/422:
        # the watch generator itself would only raise once the stream had started.
        await self.service.events(task_id, after, 1, by=by)  # type: ignore[arg-type]
        stream = self.service.watch(task_id, after, by=by)  # type: ignore[arg-type]
        return event_source(_event_messages(stream), self.sse_heartbeat_s)

    async def servers(self, request: Request) -> Response:
        infos = [s.model_dump(mode="json") for s in self.service.list_servers(by=principal_of(request.scope))]
        return JSONResponse(infos)

    async def calls(self, request: Request) -> Response:
        """The audit of exposed calls: the caller's own (an admin's: everyone's), newest first."""
        page = await self.service.list_calls(**_page_query(request, "server"), by=principal_of(request.scope))
        return _json(page.model_dump_json())

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        await self.service.ready()
        return JSONResponse({"status": "ready"})

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.openapi)


def gateway_routes(
    service: TaskService,
    *,
    auth_required: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    sse_heartbeat_s: float = SSE_HEARTBEAT_S,
) -> list[Route]:
    """The REST routes, for the one HTTP app (``opspawn_mcp.mcp_http.build_http_app``), which puts
    them behind the guard beside the MCP routes; ``auth_required`` (from the same ``Principals``
    the guard uses) makes the OpenAPI document state the bearer scheme."""
    openapi = build_openapi(
        auth_required=auth_required, servers=service.server_names, profiles=service.profile_names
    )
    h = _Routes(service, max_body_bytes, openapi, sse_heartbeat_s)
    return [
        Route("/v1/tasks", h.submit, methods=["POST"], name="submit_task"),
        Route("/v1/tasks", h.list_tasks, methods=["GET"], name="list_tasks"),
        Route("/v1/tasks/{task_id}", h.get, methods=["GET"], name="get_task"),
        Route("/v1/tasks/{task_id}/cancel", h.cancel, methods=["POST"], name="cancel_task"),
        Route("/v1/tasks/{task_id}/input", h.answer, methods=["POST"], name="answer_task"),
        Route("/v1/tasks/{task_id}/events", h.events, methods=["GET"], name="task_events"),
        Route("/v1/servers", h.servers, methods=["GET"], name="list_servers"),
        Route("/v1/audit", h.calls, methods=["GET"], name="list_calls"),
        Route("/healthz", h.healthz, methods=["GET"], name="healthz"),
        Route("/readyz", h.readyz, methods=["GET"], name="readyz"),
        Route("/openapi.json", h.openapi_json, methods=["GET"], name="openapi"),
    ]


def create_gateway(
    service: TaskService,
    guard: HttpGuard,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    sse_heartbeat_s: float = SSE_HEARTBEAT_S,
) -> Starlette:
    """The REST gateway alone (no MCP routes), behind ``guard``, as one ASGI app whose errors are
    all RFC 9457 problems: for embedding the REST API without MCP."""
    routes = gateway_routes(
        service,
        auth_required=guard.principals.auth_required,
        max_body_bytes=max_body_bytes,
        sse_heartbeat_s=sse_heartbeat_s,
    )
    return Starlette(routes=routes, middleware=guard.middleware(), exception_handlers=EXCEPTION_HANDLERS)


__all__ = ["MAX_BODY_BYTES", "PROBLEM_MEDIA_TYPE", "create_gateway", "gateway_routes"]
