"""The OpenAPI 3.1 document, generated from the same pydantic models the routes serialise.

It states the HTTP guard's refusals and the bearer scheme too. See docs/rest.md, "The HTTP guard".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gateway.problems import Problem
from opspawn_mcp.errors import PROBLEM_MEDIA_TYPE
from opspawn_mcp.host.models import ServerInfo
from opspawn_mcp.idempotency import HEADER as IDEMPOTENCY_HEADER
from opspawn_mcp.idempotency import KEY_MAX_CHARS, KEY_PATTERN
from opspawn_mcp.models import (
    NO_NUL,
    ApprovalInput,
    ExposedCallPage,
    Task,
    TaskEvent,
    TaskPage,
    TaskSpec,
    TaskStatus,
)
from opspawn_mcp.service import LIST_PAGE_MAX, SEARCH_MAX_CHARS, TASK_ID_MAX_CHARS

REF = "#/components/schemas/{model}"

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (TaskSpec, "validation"),
    (ApprovalInput, "validation"),
    (Task, "serialization"),
    (TaskPage, "serialization"),
    (TaskEvent, "serialization"),
    (ServerInfo, "serialization"),
    (ExposedCallPage, "serialization"),
    (Problem, "serialization"),
]

# Which error statuses each operation can answer; the guard's (421, 403, 401) are added by ``op``.
_DESCRIPTIONS = {
    400: "The body is not valid JSON.",
    401: "Missing or wrong bearer token.",
    403: "The Origin header names a web origin this server does not allow; for a submit, also a "
    "spec naming a server or model this caller may not use.",
    404: "No such task (or, for the audit, no such server for this caller), or no such route.",
    409: "The task's state does not allow this (e.g. cancelling a finished task, or answering a task that "
    "waits on no approval request or on another one: `pending_request_id` names the one it waits on); "
    "for a submit, an Idempotency-Key this caller used for a different request (`fields` names what "
    "differs).",
    413: "The body, or the goal in it, is too large.",
    415: "A body that is not application/json.",
    421: "The Host header names a server this is not (see opspawn.server.allowed_hosts).",
    422: "The request is well-formed but invalid; `problems` lists each invalid field.",
    429: "The caller is over one of its limits (tasks in flight, submit rate); retry after Retry-After.",
    503: "The task store (or broker) cannot be reached; retry later.",
}
_GUARD = (403, 421)
_HEADERS = {
    401: {"WWW-Authenticate": "The scheme to authenticate with: Bearer."},
    429: {"Retry-After": "Seconds until a retry can succeed."},
}


def _problems(*statuses: int) -> dict[str, Any]:
    def one(status: int) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": REF.format(model="Problem")}}},
        }
        if status in _HEADERS:
            answer["headers"] = {
                name: {"description": text, "required": True, "schema": {"type": "string"}}
                for name, text in _HEADERS[status].items()
            }
        return answer

    return {str(s): one(s) for s in statuses}


def _json(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


def _name_choices(schemas: dict[str, Any], servers: Sequence[str], profiles: Sequence[str]) -> None:
    """Name the configured servers and model profiles in the spec's schema, so a generated
    request that follows the document is one this server accepts (a principal may be allowed
    fewer: that is a 403)."""
    listed = next(
        s for s in schemas["TaskSpec"]["properties"]["servers"]["anyOf"] if s.get("type") == "array"
    )
    listed["items"] = (
        {"type": "string", "enum": list(servers)} if servers else {"type": "string", "maxLength": 0}
    )
    if not servers:
        listed["maxItems"] = 0
    profile = schemas["ModelSettings"]["properties"]["profile"]
    profile["anyOf"] = [{"type": "string", "enum": list(profiles)}, {"type": "null"}]
    profile.pop("pattern", None)


def build_openapi(
    *, auth_required: bool, servers: Sequence[str] = (), profiles: Sequence[str] = ("default",)
) -> dict[str, Any]:
    """The whole document; ``auth_required`` (``Principals.auth_required``) adds the bearer
    scheme and 401 to every operation except the probes; ``servers`` and ``profiles`` are the
    names the config defines."""
    refs, defs = models_json_schema(_MODELS, ref_template=REF)
    _name_choices(defs["$defs"], servers, profiles)

    def ref(model: type[BaseModel], mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        return dict(refs[(model, mode)])

    task_id = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": TASK_ID_MAX_CHARS, **NO_NUL},
    }
    auth = (401,) if auth_required else ()
    paging = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": LIST_PAGE_MAX, "default": 50},
        },
        {
            "name": "cursor",
            "in": "query",
            "description": "The next_cursor of the previous page: opaque, and only one "
            "this server issued is accepted (any other value is a 422).",
            "schema": {"type": "string"},
        },
    ]

    def op(
        operation_id: str, summary: str, responses: dict[str, Any], errors: tuple[int, ...] = (), **extra: Any
    ) -> dict[str, Any]:
        """One operation: its answers, plus a problem for each of ``errors`` and the guard's."""
        return {
            "summary": summary,
            "operationId": operation_id,
            **extra,
            "responses": {**responses, **_problems(*sorted({*_GUARD, *auth, *errors}))},
        }

    paths: dict[str, Any] = {
        "/v1/tasks": {
            "post": op(
                "submitTask",
                "Submit a task; it is queued and runs in a worker.",
                {
                    "202": _json(
                        "Accepted: the task is stored as queued.",
                        ref(Task),
                        headers={
                            "Location": {
                                "description": "URL of the new task.",
                                "required": True,
                                "schema": {"type": "string"},
                            }
                        },
                    )
                },
                (400, 409, 413, 415, 422, 429, 503),
                parameters=[
                    {
                        "name": IDEMPOTENCY_HEADER,
                        "in": "header",
                        "description": "A key for this request (printable ASCII, no spaces, at most "
                        f"{KEY_MAX_CHARS} characters): a repeated submit with the same key and the same "
                        "spec answers the task the first one created instead of starting another.",
                        "schema": {"type": "string", "pattern": KEY_PATTERN},
                    }
                ],
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": ref(TaskSpec, "validation")}},
                },
            ),
            "get": op(
                "listTasks",
                "List tasks, newest first.",
                {"200": _json("One page of tasks.", ref(TaskPage))},
                (422, 503),
                parameters=[
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in TaskStatus]},
                    },
                    *paging,
                    {
                        "name": "goal_contains",
                        "in": "query",
                        "description": "Only tasks whose goal contains this text (any case); blank: no filter.",
                        "schema": {"type": "string", "maxLength": SEARCH_MAX_CHARS, **NO_NUL},
                    },
                ],
            ),
        },
        "/v1/tasks/{task_id}": {
            "get": op(
                "getTask",
                "Get one task.",
                {"200": _json("The task.", ref(Task))},
                (404, 422, 503),
                parameters=[task_id],
            )
        },
        "/v1/tasks/{task_id}/cancel": {
            "post": op(
                "cancelTask",
                "Cancel an unfinished task: queued, running or input_required (cancelling a cancelled task "
                "is a no-op).",
                {"200": _json("The task, now cancelled.", ref(Task))},
                (404, 409, 415, 422, 503),
                parameters=[task_id],
            )
        },
        "/v1/tasks/{task_id}/input": {
            "post": op(
                "answerTask",
                "Answer the approval request an input_required task waits on (its `approval`); the task is "
                "queued again and goes on: approved, the tool call runs; denied, the agent reads the note.",
                {"200": _json("The task, queued again.", ref(Task))},
                (400, 404, 409, 413, 415, 422, 503),
                parameters=[task_id],
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": ref(ApprovalInput, "validation")}},
                },
            )
        },
        "/v1/tasks/{task_id}/events": {
            "get": op(
                "watchTask",
                "Server-Sent Events: the task's events, then live ones until the task ends.",
                {
                    "200": {
                        "description": (
                            "An event stream. Each SSE event has `id` = the event's seq, `event` = its kind "
                            "and `data` = the TaskEvent as JSON (`x-sse-data`); a failure after the stream "
                            "started ends it with one `event: problem` whose data is a Problem. The stream ends when the task has ended. "
                            "Reconnect with `Last-Event-ID` to resume after the last event received."
                        ),
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                # OpenAPI 3.1 cannot type SSE frames: this names what each `data` is.
                                "x-sse-data": ref(TaskEvent),
                            }
                        },
                    }
                },
                (404, 422, 503),
                parameters=[
                    task_id,
                    {
                        "name": "after_seq",
                        "in": "query",
                        "description": "Start after this event seq (0: from the start).",
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Set by SSE clients on reconnect; wins over after_seq.",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                ],
            )
        },
        "/v1/servers": {
            "get": op(
                "listServers",
                "The downstream MCP servers tasks may use, with their state and tools.",
                {"200": _json("The servers.", {"type": "array", "items": ref(ServerInfo)})},
            )
        },
        "/v1/audit": {
            "get": op(
                "listCalls",
                "The audit of calls MCP clients made through exposed servers (mcpServers.X.expose): tool "
                "calls, resource reads, prompt gets, newest first; the caller's own, an admin's everyone's.",
                {"200": _json("One page of calls.", ref(ExposedCallPage))},
                (404, 422, 503),
                parameters=[
                    {
                        "name": "server",
                        "in": "query",
                        "description": "Only the calls to this server (404 for one the caller may not use).",
                        "schema": {"type": "string", **({"enum": list(servers)} if servers else {})},
                    },
                    *paging,
                ],
            )
        },
    }
    status_schema = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    paths["/healthz"] = {
        "get": {
            "summary": "Liveness: the process is up.",
            "operationId": "healthz",
            "responses": {"200": _json("Up.", status_schema), **_problems(*_GUARD)},
        }
    }
    paths["/readyz"] = {
        "get": {
            "summary": "Readiness: the task store and broker can be reached.",
            "operationId": "readyz",
            "responses": {"200": _json("Ready.", status_schema), **_problems(*_GUARD, 503)},
        }
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "opspawn REST gateway",
            "version": "1",
            "description": "The task API of opspawn for plain HTTP clients; the same TaskService as MCP and gRPC.",
        },
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
    if auth_required:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for path in ("/healthz", "/readyz"):
            paths[path]["get"]["security"] = []
    return doc
