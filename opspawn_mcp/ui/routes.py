"""The dashboard's routes: pages, the fragments its script swaps in, its actions, its SSE.

See docs/operations.md, "Dashboard".
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.app import MAX_BODY_BYTES, SSE_HEARTBEAT_S, SseMessage, event_source, read_body
from gateway.problems import error_response
from opspawn_mcp.errors import Door, InvalidInput, NotFound, OpspawnError
from opspawn_mcp.http_guard import DASHBOARD_SIGN_IN
from opspawn_mcp.models import Task, TaskEvent
from opspawn_mcp.principals import Principal, Principals, principal_of
from opspawn_mcp.service import EVENTS_PAGE_MAX, TaskService
from opspawn_mcp.ui import session
from opspawn_mcp.ui.render import Durations, build_environment

PAGE_SIZE = 50
CALLS_SHOWN = 50
"""Exposed calls the servers page shows, newest first (the rest: ``GET /v1/audit``)."""
SUMMARY_KINDS = frozenset({"state", "llm", "final", "error", "input_required", "input_answered"})
"""Events after which the task's summary (status, steps, tokens, buttons) is sent again."""
SECURITY_HEADERS = {
    # No inline script or style, nothing from elsewhere, never inside another site's frame.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[Request], Awaitable[Response]]


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await read_body(request, MAX_BODY_BYTES))
    except (ValueError, RecursionError):
        raise InvalidInput("The request body is not valid JSON.") from None


def _local(url: URL) -> str:
    """A link to this server as a path and query: right behind any proxy that rewrites the host."""
    return url.path + (f"?{url.query}" if url.query else "")


def sse_message(event: str, html: str, seq: int | None = None) -> SseMessage:
    """One SSE message whose data is an HTML fragment (sent as one ``data:`` line per line of it)."""
    return {"event": event, "data": html} | ({"id": str(seq)} if seq is not None else {})


class Dashboard:
    """The handlers, bound to one service and the principals of the guard in front of them."""

    def __init__(self, service: TaskService, principals: Principals, heartbeat_s: float) -> None:
        self.service = service
        self.principals = principals
        self.heartbeat_s = heartbeat_s
        self.env = build_environment()

    def render(self, template: str, code: int = 200, /, **context: Any) -> HTMLResponse:
        body = self.env.get_template(template).render(**context)
        return HTMLResponse(body, status_code=code, headers=SECURITY_HEADERS)

    def page(self, handler: Handler) -> Handler:
        """``handler`` with its typed errors rendered as an HTML page instead of a problem."""

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except OpspawnError as exc:
                message = exc.message_for(Door.UI)
                return self.render("error.html", exc.status, message=message, **self._chrome(request))

        return guarded

    def call(self, handler: Handler) -> Handler:
        """``handler`` for the script (fragments, actions): its typed errors as RFC 9457 problems
        whose ``detail``, which the page shows, names the dashboard's pages, not the API's."""

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except OpspawnError as exc:
                return error_response(exc, door=Door.UI)

        return guarded

    def _chrome(self, request: Request) -> dict[str, Any]:
        """What every page's header shows: who is signed in, and whether they can sign out."""
        return {"principal": principal_of(request.scope), "signed_in": self.principals.auth_required}

    # -- the task list ------------------------------------------------------------------------

    async def _page_of_tasks(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        status, text, cursor = query.get("status", ""), query.get("q", ""), query.get("cursor", "")
        page = await self.service.list_tasks(
            status or None,
            PAGE_SIZE,
            cursor or None,
            goal_contains=text or None,
            by=principal_of(request.scope),
        )
        filters = {k: v for k, v in (("status", status), ("q", text)) if v}
        older = {**filters, "cursor": page.next_cursor} if page.next_cursor else None
        return {
            "page": page,
            "status": status,
            "q": text,
            "filtered": bool(filters),
            "rows_url": _local(request.url_for("ui_task_rows").include_query_params(**query)),
            "older_url": _local(request.url_for("ui_tasks").include_query_params(**older)) if older else None,
        }

    async def tasks(self, request: Request) -> Response:
        return self.render("tasks.html", **await self._page_of_tasks(request), **self._chrome(request))

    async def task_rows(self, request: Request) -> Response:
        return self.render("_task_rows.html", **await self._page_of_tasks(request))

    async def submit(self, request: Request) -> Response:
        """A task from the dashboard's form: the body is a task spec, as for ``POST /v1/tasks``."""
        task = await self.service.submit(await _json_body(request), by=principal_of(request.scope))
        url = request.url_for("ui_task", task_id=task.id).path
        return JSONResponse({"task_id": task.id, "url": url}, status_code=201, headers={"Location": url})

    # -- one task -----------------------------------------------------------------------------

    async def task(self, request: Request) -> Response:
        by = principal_of(request.scope)
        task = await self.service.get(request.path_params["task_id"], by=by)
        events = await self.service.events(task.id, 0, EVENTS_PAGE_MAX, by=by)
        live = not task.status.terminal or len(events) == EVENTS_PAGE_MAX
        last = events[-1].seq if events else 0
        stream = request.url_for("ui_task_events", task_id=task.id).include_query_params(after_seq=last)
        durations = Durations()
        return self.render(
            "task.html",
            task=task,
            rows=[(event, durations.took(event)) for event in events],
            stream_url=_local(stream) if live else None,
            **self._chrome(request),
        )

    async def cancel(self, request: Request) -> Response:
        task = await self.service.cancel(request.path_params["task_id"], by=principal_of(request.scope))
        return self.render("_summary.html", task=task)

    async def answer(self, request: Request) -> Response:
        """Approve or deny: ``{"request_id", "approve", "note"}``, as for ``POST /v1/tasks/{id}/input``."""
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidInput('Send {"request_id": ..., "approve": true or false, "note": ...} as JSON.')
        request_id = body.pop("request_id", None)
        task_id = request.path_params["task_id"]
        task = await self.service.answer(task_id, request_id, body, by=principal_of(request.scope))
        return self.render("_summary.html", task=task)

    async def events(self, request: Request) -> Response:
        """The timeline's live part: each new event as a rendered row, the summary again after
        the events that change it, and ``end`` once the task is over (so the page stops
        listening instead of reconnecting); ``Last-Event-ID`` resumes after a reconnect."""
        by = principal_of(request.scope)
        raw = request.headers.get("last-event-id", request.query_params.get("after_seq", "0"))
        after = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else -1
        task = await self.service.get(request.path_params["task_id"], by=by)
        await self.service.events(task.id, after, 1, by=by)  # a bad seq is a 422 before the 200
        # The rows the page already shows start the durations of the ones that come in.
        durations = Durations()
        for seen in (
            await self.service.events(task.id, 0, min(after, EVENTS_PAGE_MAX), by=by) if after else []
        ):
            durations.took(seen)
        return event_source(self._timeline(task, after, durations, by), self.heartbeat_s, Door.UI)

    async def _timeline(
        self, task: Task, after: int, durations: Durations, by: Principal
    ) -> AsyncGenerator[SseMessage, None]:
        events: AsyncGenerator[TaskEvent, None] = self.service.watch(task.id, after, by=by)
        try:
            async for event in events:
                took = durations.took(event)
                row = self.env.get_template("_event.html").render(event=event, task=task, took=took)
                yield sse_message("item", row, event.seq)
                if event.kind in SUMMARY_KINDS:
                    task = await self.service.get(task.id, by=by)
                    yield sse_message("summary", self.env.get_template("_summary.html").render(task=task))
            yield sse_message("end", "")
        finally:
            await events.aclose()

    # -- servers, sign-in, the rest -----------------------------------------------------------

    async def servers(self, request: Request) -> Response:
        by = principal_of(request.scope)
        servers = self.service.list_servers(by=by)
        calls = await self.service.list_calls(limit=CALLS_SHOWN, by=by)
        return self.render("servers.html", servers=servers, calls=calls.calls, **self._chrome(request))

    async def call_rows(self, request: Request) -> Response:
        """The newest exposed calls from the audit (the caller's own; an admin's: everyone's)."""
        calls = await self.service.list_calls(limit=CALLS_SHOWN, by=principal_of(request.scope))
        return self.render("_call_rows.html", calls=calls.calls)

    async def server_rows(self, request: Request) -> Response:
        return self.render(
            "_server_rows.html", servers=self.service.list_servers(by=principal_of(request.scope))
        )

    async def sign_in_page(self, request: Request) -> Response:
        if not self.principals.auth_required:
            return RedirectResponse(request.url_for("ui_tasks").path, status_code=303)
        back = session.safe_next(request.query_params.get("next"))
        return self.render("login.html", next_url=back, principal=None)

    async def sign_in(self, request: Request) -> Response:
        return await session.sign_in(request, self.principals)

    async def sign_out(self, request: Request) -> Response:
        return session.sign_out()

    async def not_found(self, request: Request) -> Response:
        raise NotFound(f"The dashboard has no page {request.url.path}; its pages are /ui and /ui/servers.")


def dashboard_routes(
    service: TaskService, principals: Principals, *, sse_heartbeat_s: float = SSE_HEARTBEAT_S
) -> list[BaseRoute]:
    """The ``/ui`` routes, for the one HTTP app behind the guard (``Runtime.http_app``);
    ``principals`` are the guard's, so the sign-in form accepts exactly the tokens it does."""
    d = Dashboard(service, principals, sse_heartbeat_s)
    return [
        Route("/ui", d.page(d.tasks), methods=["GET"], name="ui_tasks"),
        Route("/ui/tasks", d.call(d.submit), methods=["POST"], name="ui_submit"),
        Route("/ui/tasks/rows", d.call(d.task_rows), methods=["GET"], name="ui_task_rows"),
        Route("/ui/tasks/{task_id}", d.page(d.task), methods=["GET"], name="ui_task"),
        Route("/ui/tasks/{task_id}/cancel", d.call(d.cancel), methods=["POST"], name="ui_cancel"),
        Route("/ui/tasks/{task_id}/input", d.call(d.answer), methods=["POST"], name="ui_answer"),
        Route("/ui/tasks/{task_id}/events", d.call(d.events), methods=["GET"], name="ui_task_events"),
        Route("/ui/servers", d.page(d.servers), methods=["GET"], name="ui_servers"),
        Route("/ui/servers/rows", d.call(d.server_rows), methods=["GET"], name="ui_server_rows"),
        Route("/ui/servers/calls", d.call(d.call_rows), methods=["GET"], name="ui_call_rows"),
        Route(DASHBOARD_SIGN_IN, d.sign_in_page, methods=["GET"], name="ui_sign_in_page"),
        Route(DASHBOARD_SIGN_IN, d.call(d.sign_in), methods=["POST"], name="ui_sign_in"),
        Route("/ui/logout", d.call(d.sign_out), methods=["POST"], name="ui_sign_out"),
        Mount("/ui/static", StaticFiles(packages=[("opspawn_mcp.ui", "static")]), name="ui_static"),
        Route("/ui/{path:path}", d.page(d.not_found), methods=["GET"]),
    ]
