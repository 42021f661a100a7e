"""opspawn's tasks as MCP Tasks: ``TaskService`` as the ``TaskBackend`` of the tasks extension.

Our task id is the MCP task id and the store answers ``tasks/get``; the status mapping is in
docs/mcp-server.md, "Two protocol eras, and MCP Tasks".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallToolRequestParams,
    CallToolResult,
    Result,
    TextContent,
)
from pydantic import BaseModel, ValidationError

from opspawn_mcp.chaining import chain_from_meta
from opspawn_mcp.errors import Conflict, InvalidInput, NotFound, OpspawnError
from opspawn_mcp.idempotency import key_from_meta
from opspawn_mcp.mcp_tasks import DetailedTask, TaskStatusName, TaskSupport, UnknownTask
from opspawn_mcp.mcp_tasks.backend import RequestContext
from opspawn_mcp.mcp_views import error_line
from opspawn_mcp.models import ApprovalAnswer, ApprovalRequest, Task, TaskEvent, TaskSpec, TaskStatus
from opspawn_mcp.principals import Principal, principal_of
from opspawn_mcp.recovery import GAVE_UP_PREFIX
from opspawn_mcp.runner import INTERNAL_ERROR_REASON
from opspawn_mcp.service import EVENTS_PAGE_MAX, TaskService, empty_goal, invalid

SUBMIT_ARGUMENTS = frozenset({*TaskSpec.model_fields, "wait"} - {"chain"})
"""The arguments submit_task takes: the spec's fields (but ``chain``, which comes from the
request's ``_meta``) and ``wait``."""
POLL_INTERVAL_MS = 1000
INFRASTRUCTURE_FAILURES = (INTERNAL_ERROR_REASON, GAVE_UP_PREFIX)
"""How the reasons opspawn itself writes when it, not the agent, failed a task begin."""


def submit_spec(arguments: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """submit_task's arguments as a task spec for ``TaskService.submit`` (``wait`` is not part of
    it), with the delegation chain the request's ``_meta`` carries (``opspawn_mcp.chaining``). A
    missing goal gets the service's own message and an unknown argument is refused with the
    names it takes (the SDK would drop it silently)."""
    if "goal" not in arguments:
        raise empty_goal()
    unknown = sorted(set(arguments) - SUBMIT_ARGUMENTS)
    if unknown:
        raise InvalidInput(
            f"submit_task has no argument(s) {', '.join(map(repr, unknown))}; it takes: "
            f"{', '.join(sorted(SUBMIT_ARGUMENTS))}.",
            problems=[f"{u}: unknown argument" for u in unknown],
        )
    named = {k: v for k, v in arguments.items() if k != "wait"}
    chain = chain_from_meta(meta)
    if chain:
        named["chain"] = chain
    return {k: v for k, v in named.items() if v is not None}


def requester(ctx: RequestContext, local: Principal) -> Principal:
    """Who sent this MCP request: over HTTP the principal the HTTP guard authenticated; with no
    HTTP request (stdio, an in-process client) the local user, ``local``."""
    request = ctx.request
    return local if request is None else principal_of(request.scope)


def infrastructure_failure(task: Task) -> bool:
    """A failure of opspawn (not of the agent): MCP Tasks reports it as ``failed``."""
    return task.status is TaskStatus.FAILED and (task.error or "").startswith(INFRASTRUCTURE_FAILURES)


def approval_input(approval: ApprovalRequest) -> dict[str, Any]:
    """The pending approval as the ``elicitation/create`` form a Tasks client shows a person."""
    schema = {
        "type": "object",
        "properties": {
            "approve": {"type": "boolean", "title": "Approve", "description": "Run this tool call?"},
            "note": {
                "type": "string",
                "title": "Note",
                "description": "Why; the agent reads it with a denial.",
            },
        },
        "required": ["approve"],
    }
    return {
        "method": "elicitation/create",
        "params": {"mode": "form", "message": approval.message, "requestedSchema": schema},
    }


def approval_answer(response: Any) -> ApprovalAnswer:
    """An elicitation response as an answer: accepted with ``approve: true`` approves; a decline,
    a cancel or ``approve: false`` denies. A malformed one is -32602 naming what is wrong."""
    if not isinstance(response, Mapping) or response.get("action") not in ("accept", "decline", "cancel"):
        raise MCPError(
            code=INVALID_PARAMS,
            message='An approval response is an elicitation result: {"action": "accept"|"decline"|"cancel", '
            '"content": {"approve": true|false, "note": "..."}}.',
        )
    content = response.get("content") or {}
    accepted = response["action"] == "accept"
    note = content.get("note") if isinstance(content, Mapping) else None
    try:
        return ApprovalAnswer(
            approve=accepted and isinstance(content, Mapping) and content.get("approve") is True,
            note=note if note is not None or accepted else f"the client answered {response['action']}",
        )
    except ValidationError as exc:
        refused = invalid("approval answer", exc, root="(answer)")
        raise MCPError(code=INVALID_PARAMS, message=refused.message) from None


def _text(text: str, *, error: bool = False, structured: Any = None) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)], is_error=error, structured_content=structured
    )


_STATUS: dict[TaskStatus, TaskStatusName] = {
    TaskStatus.QUEUED: "working",
    TaskStatus.RUNNING: "working",
    TaskStatus.INPUT_REQUIRED: "input_required",
    TaskStatus.COMPLETED: "completed",
    TaskStatus.FAILED: "completed",  # the agent failed: its tool call completed with isError
    TaskStatus.CANCELLED: "cancelled",
}


def _status(task: Task) -> TaskStatusName:
    return "failed" if infrastructure_failure(task) else _STATUS[task.status]


LATEST_REMEMBERED = 1024
"""Tasks whose newest event a backend remembers between polls (the oldest is forgotten first)."""


def event_line(event: TaskEvent) -> str:
    """One event in a few words, for a task's status message: its kind, the tool, the message."""
    data = event.data
    name = data.get("name") or data.get("tool")
    failed = "failed" if event.kind == "tool_result" and data.get("is_error") else None
    message = data.get("message") if event.kind == "progress" else None
    words = [event.kind, name, failed, message]
    return " ".join(str(w) for w in words if isinstance(w, str) and w)[:200]


class LatestEvents:
    """The newest event of each task a Tasks client follows, read incrementally: each poll of a
    running task reads only the events written since the last one, so a delegating opspawn's
    progress shows what this task is doing (chaining, docs/composition.md)."""

    def __init__(self, service: TaskService, size: int = LATEST_REMEMBERED) -> None:
        self._service = service
        self._size = size
        self._seen: OrderedDict[str, tuple[int, str | None]] = OrderedDict()

    async def line(self, task: Task, by: Principal) -> str | None:
        seq, line = self._seen.pop(task.id, (0, None))
        while True:
            events = await self._service.events(task.id, seq, EVENTS_PAGE_MAX, by=by)
            if events:
                seq, line = events[-1].seq, event_line(events[-1])
            if len(events) < EVENTS_PAGE_MAX:
                break
        self._seen[task.id] = (seq, line)
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return line


class ServiceTaskBackend:
    """``TaskService`` behind ``TasksExtension``; ``view`` shapes a task as submit_task answers it."""

    def __init__(self, service: TaskService, local: Principal, view: Callable[[Task], BaseModel]) -> None:
        self._service = service
        self._local = local
        self._view = view
        self._latest = LatestEvents(service)

    def _caller(self, ctx: RequestContext) -> Principal:
        return requester(ctx, self._local)

    def support(self, tool: str) -> TaskSupport | None:
        return "optional" if tool == "submit_task" else None

    async def create(self, params: CallToolRequestParams, ctx: RequestContext) -> DetailedTask | Result:
        try:
            spec = submit_spec(params.arguments or {}, params.meta)
            key = key_from_meta(params.meta)
            task = await self._service.submit(spec, by=self._caller(ctx), idempotency_key=key)
        except OpspawnError as exc:
            return _text(error_line(exc, ctx), error=True)
        return self._detailed(task)

    async def _task(self, task_id: str, ctx: RequestContext) -> Task:
        try:
            return await self._service.get(task_id, by=self._caller(ctx))
        except (NotFound, InvalidInput):
            raise UnknownTask(task_id) from None

    async def get(self, task_id: str, ctx: RequestContext) -> DetailedTask:
        task = await self._task(task_id, ctx)
        latest = None
        if task.status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            latest = await self._latest.line(task, self._caller(ctx))
        return self._detailed(task, latest)

    async def update(self, task_id: str, responses: dict[str, Any], ctx: RequestContext) -> None:
        task = await self._task(task_id, ctx)
        if task.approval is None or task.approval.id not in responses:
            return  # nothing pending that these answer: ignored, as the extension says
        answer = approval_answer(responses[task.approval.id])
        try:
            await self._service.answer(task.id, task.approval.id, answer, by=self._caller(ctx))
        except Conflict:
            return  # answered meanwhile (another answer, its timeout, a cancel): nothing to do

    async def cancel(self, task_id: str, ctx: RequestContext) -> None:
        task = await self._task(task_id, ctx)
        try:
            await self._service.cancel(task.id, by=self._caller(ctx))
        except Conflict:
            return  # already completed or failed: the ack is the same

    def _detailed(self, task: Task, latest: str | None = None) -> DetailedTask:
        status = _status(task)
        view = self._view(task).model_dump(mode="json")
        result = error = inputs = None
        message = task.error
        if task.status is TaskStatus.COMPLETED:
            result = _text(task.result or "", structured=view)
            message = None
        elif status == "completed":  # the agent failed: a tool error, not a protocol one
            result = _text(task.error or "the agent failed", error=True, structured=view)
        elif status == "failed":
            error = {"code": INTERNAL_ERROR, "message": task.error or "opspawn failed the task"}
        elif status == "input_required" and task.approval is not None:
            inputs = {task.approval.id: approval_input(task.approval)}
            message = task.approval.message
        elif status == "working":
            message = f"{task.status.value}, {task.steps} step(s) taken" + (
                f"; last event: {latest}" if latest else ""
            )
        requested = task.approval.requested_at if task.approval is not None else None
        moments = [
            m for m in (task.created_at, task.started_at, task.finished_at, requested) if m is not None
        ]
        return DetailedTask(
            task_id=task.id,
            status=status,
            status_message=message,
            created_at=task.created_at,
            last_updated_at=max(moments),
            ttl_ms=None,
            poll_interval_ms=POLL_INTERVAL_MS,
            result=None
            if result is None
            else result.model_dump(by_alias=True, mode="json", exclude_none=True),
            error=error,
            input_requests=inputs,
        )
