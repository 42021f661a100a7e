"""The Tasks extension's wire shapes (SEP-2663), for servers and clients alike.

See docs/mcp-server.md, "Two protocol eras, and MCP Tasks".
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from mcp_types import Notification, Request, RequestParams, Result
from pydantic import BaseModel, ConfigDict, Field, field_serializer
from pydantic.alias_generators import to_camel

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
"""The extension's identifier, under ``capabilities.extensions`` on both sides."""

TaskStatusName = Literal["working", "input_required", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class Task(BaseModel):
    """A task's operational metadata, as every tasks-surface answer carries it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    task_id: str
    status: TaskStatusName
    status_message: str | None = None
    created_at: datetime
    last_updated_at: datetime
    ttl_ms: int | None = Field(description="Milliseconds from creation the task is kept; null: no limit.")
    poll_interval_ms: int | None = None

    @field_serializer("created_at", "last_updated_at")
    def _iso(self, value: datetime) -> str:
        return value.isoformat()

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def wire(self) -> dict[str, Any]:
        """The JSON object on the wire: absent optionals left out, but ``ttlMs`` always present
        (``null`` means unlimited, which is not the same as unsaid)."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True) | {"ttlMs": self.ttl_ms}


class CreateTaskResult(Result, Task):
    """What a task-supporting ``tools/call`` answers with when it made a task."""

    result_type: Literal["task"] = "task"


class DetailedTask(Result, Task):
    """``tasks/get``: the task with its status's payload inlined."""

    result_type: Literal["complete"] = "complete"
    result: dict[str, Any] | None = Field(default=None, description="The tool's result, once completed.")
    error: dict[str, Any] | None = Field(default=None, description="The JSON-RPC error, once failed.")
    input_requests: dict[str, dict[str, Any]] | None = Field(
        default=None, description="Requests the client must answer with tasks/update (input_required)."
    )


class TaskIdParams(RequestParams):
    task_id: str


class UpdateTaskParams(TaskIdParams):
    input_responses: dict[str, Any] = Field(default_factory=dict)


class GetTaskRequest(Request[TaskIdParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    name_param = "taskId"


class UpdateTaskRequest(Request[UpdateTaskParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    name_param = "taskId"


class CancelTaskRequest(Request[TaskIdParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    name_param = "taskId"


class TaskStatusNotification(Notification[dict[str, Any], Literal["notifications/tasks"]]):
    """A task's new state on a ``subscriptions/listen`` stream: a ``DetailedTask`` as params."""

    method: Literal["notifications/tasks"] = "notifications/tasks"
