"""The typed errors every front door maps, and the hints that word each fix in a door's own terms.

Each kind carries its HTTP status and gRPC code, so every door maps it once. See
docs/architecture.md, "One service, three doors", and docs/mcp-server.md, "Tools" (Errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from typing import Any, ClassVar

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:opspawn:problem:"
_PROBLEM_MEMBERS = frozenset({"type", "title", "status", "detail", "kind"})


def problem_document(status: int, kind: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem: ``type`` names the kind as a URN, extensions carry the details."""
    document: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + kind,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "kind": kind,
    }
    document.update({k: v for k, v in extra.items() if v is not None})
    return document


class Door(StrEnum):
    """The ways in: each words a hint with its own commands or routes."""

    MCP = "mcp"
    REST = "rest"
    GRPC = "grpc"
    CLI = "cli"
    UI = "ui"


ACTIONS: dict[str, dict[Door, str]] = {
    "list_tasks": {
        Door.MCP: "the list_tasks tool",
        Door.REST: "GET /v1/tasks",
        Door.GRPC: "ListTasks",
        Door.CLI: "`opspawn-mcp tasks`",
        Door.UI: "the task list at /ui",
    },
    "list_servers": {
        Door.MCP: "the list_servers tool",
        Door.REST: "GET /v1/servers",
        Door.GRPC: "the REST route GET /v1/servers",
        Door.CLI: "`opspawn-mcp servers`",
        Door.UI: "the servers page at /ui/servers",
    },
    "show_task": {
        Door.MCP: "get_status",
        Door.REST: "GET /v1/tasks/{id}",
        Door.GRPC: "GetTask",
        Door.CLI: "`opspawn-mcp status ID`",
        Door.UI: "the task's page at /ui",
    },
    "submit": {
        Door.MCP: "submit_task",
        Door.REST: "POST /v1/tasks",
        Door.GRPC: "SubmitTask",
        Door.CLI: "`opspawn-mcp submit`",
        Door.UI: "the New task form at /ui",
    },
}
"""Each action a hint can point to, by door: the one place that names another door's commands."""
CLI_CLIENT_NAME = "opspawn-mcp"
"""The MCP ``clientInfo`` name the CLI sends, so the MCP door words its hints for the CLI."""


@dataclass(frozen=True)
class Hint:
    """What to do next: ``template`` (written in code, never from input) has one ``{}`` for the
    name ``action`` has at the door that answers."""

    template: str
    action: str

    def text(self, door: Door) -> str:
        return self.template.format(ACTIONS[self.action][door])


class OpspawnError(Exception):
    """Base of every error opspawn reports to a client.

    ``message`` is worded for MCP (the main door, and what logs show); each door answers with
    ``message_for`` itself."""

    kind: ClassVar[str] = "error"
    status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"

    def __init_subclass__(
        cls, *, kind: str | None = None, status: int | None = None, grpc_code: str | None = None
    ) -> None:
        """A subclass states its facts in its header (``kind=``, ``status=``, ``grpc_code=``);
        what it leaves out it inherits (``PayloadTooLarge`` answers gRPC as ``InvalidInput``)."""
        super().__init_subclass__()
        cls.kind = kind or cls.kind
        cls.status = status or cls.status
        cls.grpc_code = grpc_code or cls.grpc_code

    def __init__(self, message: str, *, hint: Hint | None = None, **details: Any) -> None:
        self.facts = message
        self.hint = hint
        self.message = self.message_for(Door.MCP)
        super().__init__(self.message)
        self.details = details

    def message_for(self, door: Door) -> str:
        """The message as ``door`` says it: the facts, then the hint in that door's words."""
        return self.facts if self.hint is None else f"{self.facts} {self.hint.text(door)}"

    def problem(self, door: Door = Door.REST) -> dict[str, Any]:
        """This error as an RFC 9457 problem document (the REST body, any HTTP 401, and the
        dashboard's script calls, worded for ``Door.UI``)."""
        extra = {k: v for k, v in self.details.items() if k not in _PROBLEM_MEMBERS}
        return problem_document(self.status, self.kind, self.message_for(door), **extra)


class InvalidInput(OpspawnError, kind="invalid_input", status=422, grpc_code="INVALID_ARGUMENT"):
    """The request is malformed: wrong type, empty goal, out-of-range limit."""


class PayloadTooLarge(InvalidInput, kind="payload_too_large", status=413):
    """A request body over the door's size limit."""


class NotFound(OpspawnError, kind="not_found", status=404, grpc_code="NOT_FOUND"):
    """The task, server or resource named does not exist (for this caller)."""


class TaskNotFound(NotFound):
    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"No task with id {task_id!r}.",
            hint=Hint("List tasks with {} to find valid ids.", "list_tasks"),
            task_id=task_id,
        )


class Forbidden(OpspawnError, kind="forbidden", status=403, grpc_code="PERMISSION_DENIED"):
    """The caller named something the config does not allow (a server, a tool)."""


class LoopDetected(Forbidden, kind="loop_detected"):
    """A delegated goal came back to an instance it passed through, or came through more
    instances than ``opspawn.chaining.max_depth`` allows (docs/composition.md, "Chaining"). A
    refusal of the caller's request (403), not a failure of this server."""


class Unauthenticated(OpspawnError, kind="unauthenticated", status=401, grpc_code="UNAUTHENTICATED"):
    """A network door's request without a valid bearer token."""


class MisdirectedRequest(OpspawnError, kind="misdirected_request", status=421, grpc_code="PERMISSION_DENIED"):
    """HTTP only: the Host header names a server this is not (DNS rebinding, a wrong proxy)."""


class UnsupportedMediaType(InvalidInput, kind="unsupported_media_type", status=415):
    """HTTP only: a request body that is not ``application/json``."""


class Conflict(OpspawnError, kind="conflict", status=409, grpc_code="FAILED_PRECONDITION"):
    """The request is valid but the task's current state does not allow it."""


class IllegalTransition(Conflict):
    def __init__(self, task_id: str, current: str, wanted: str) -> None:
        super().__init__(
            f"Task {task_id} is {current}; it cannot become {wanted}.",
            task_id=task_id,
            current=current,
            wanted=wanted,
        )


class RateLimited(OpspawnError, kind="rate_limited", status=429, grpc_code="RESOURCE_EXHAUSTED"):
    """The caller is over one of its limits (tasks in flight, submit rate); ``retry_after_s`` says
    when trying again can succeed. REST adds ``Retry-After``, gRPC ``retry-after`` metadata."""

    def __init__(self, message: str, *, retry_after_s: float, **details: Any) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(
            f"{message} Retry in {self.retry_after_s} s.", retry_after_s=self.retry_after_s, **details
        )


class Unavailable(OpspawnError, kind="unavailable", status=503, grpc_code="UNAVAILABLE"):
    """A dependency (store, broker, downstream MCP server, LLM) cannot be reached right now."""


class ConfigError(OpspawnError, kind="config_error", status=400, grpc_code="INVALID_ARGUMENT"):
    """The config file is wrong; ``problems`` holds one line per problem with its JSON path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}", problems=problems)
        self.problems = problems
