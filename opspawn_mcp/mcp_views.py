"""What opspawn's MCP tools answer: a task as an MCP caller sees it (``TaskView``, with a
``next`` hint worded for an LLM), a page of them, and the downstream servers.

The task's fields are decided once on ``opspawn_mcp.models.Task``; docs/mcp-server.md shows them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mcp.server.context import ServerRequestContext
from pydantic import BaseModel, Field

from opspawn_mcp.errors import CLI_CLIENT_NAME, Door, OpspawnError
from opspawn_mcp.host.models import ServerInfo
from opspawn_mcp.models import ApprovalRequest, Task, TaskStatus, Usage


class TaskProgress(BaseModel):
    steps: int = Field(description="Agent steps taken so far.")
    max_steps: int = Field(description="The step budget; the task fails if it needs more.")


class TaskView(BaseModel):
    """A task as an MCP caller sees it: what it needs to decide its next call, nothing internal."""

    task_id: str
    status: TaskStatus
    done: bool = Field(description="True once the task is completed, failed or cancelled.")
    goal: str
    servers: list[str] | None = Field(description="Downstream servers allowed; null means all.")
    progress: TaskProgress
    result: str | None = Field(description="The agent's answer, once completed.")
    error: str | None = Field(description="Why it failed or was cancelled.")
    warning: str | None = Field(default=None, description=Task.model_fields["warning"].description)
    approval: ApprovalRequest | None = Field(
        default=None, description=Task.model_fields["approval"].description
    )
    usage: Usage
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next: str = Field(description="What to do next with this task.")

    @classmethod
    def of(cls, task: Task) -> TaskView:
        status = task.status
        if status is TaskStatus.COMPLETED and task.warning:
            hint = "Done, with a warning: read `warning` before you rely on `result`."
        elif status is TaskStatus.COMPLETED:
            hint = "Done: read `result`."
        elif status is TaskStatus.FAILED:
            hint = "Failed: read `error`; fix the goal or servers and submit again."
        elif status is TaskStatus.CANCELLED:
            hint = "Cancelled; submit again if still needed."
        elif task.approval is not None:
            hint = (
                f"Waiting for a person: ask the user about `approval`, then call approve_task with "
                f"task_id {task.id!r} and request_id {task.approval.id!r} (approve true or false)."
            )
        else:
            hint = f"Still {status.value}: call get_status with task_id {task.id!r} later, or cancel_task."
        return cls(
            task_id=task.id,
            done=status.terminal,
            goal=task.spec.goal,
            servers=task.spec.servers,
            progress=TaskProgress(steps=task.steps, max_steps=task.spec.max_steps),
            next=hint,
            **{name: getattr(task, name) for name in _AS_ON_TASK},
        )


_AS_ON_TASK = TaskView.model_fields.keys() & Task.model_fields.keys()
"""The fields a ``TaskView`` shows as ``Task`` holds them (status, result, error, usage, times...)."""


class TaskList(BaseModel):
    tasks: list[TaskView]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next (older) page; null at the end."
    )


class ServerList(BaseModel):
    servers: list[ServerInfo]


def error_line(exc: OpspawnError, ctx: ServerRequestContext[Any, Any] | None) -> str:
    """A typed error as an MCP tool error's one line, for the tools and a submit over MCP Tasks
    alike: kind first, then the fix, worded for the CLI's commands when the caller is opspawn's
    own CLI (``CLI_CLIENT_NAME``)."""
    params = ctx.session.client_params if ctx is not None else None
    name = params.client_info.name if params is not None else None
    door = Door.CLI if name == CLI_CLIENT_NAME else Door.MCP
    return f"{exc.kind}: {exc.message_for(door)}"
