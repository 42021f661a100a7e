"""A Tasks-aware MCP client for tests: declares ``io.modelcontextprotocol/tasks``, accepts
``resultType: "task"`` and follows a task with ``tasks/get``."""

from __future__ import annotations

from typing import Any

import anyio
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import ClientSession
from mcp.types import CallToolResult

from opspawn_mcp.mcp_tasks import TASKS_EXTENSION, CreateTaskResult, DetailedTask, GetTaskRequest
from opspawn_mcp.mcp_tasks.wire import TaskIdParams

POLLS = 600
"""Bound on every tasks/get loop (pytest-timeout bounds the time)."""


async def follow(session: ClientSession, task_id: str, until: frozenset[str]) -> DetailedTask:
    for _ in range(POLLS):
        task = await session.send_request(GetTaskRequest(params=TaskIdParams(task_id=task_id)), DetailedTask)
        if task.status in until:
            return task
        await anyio.sleep((task.poll_interval_ms or 100) / 1000)
    raise AssertionError(f"task {task_id} never reached {sorted(until)}")


TERMINAL = frozenset({"completed", "failed", "cancelled"})


class TasksAware(ClientExtension):
    """Declares the tasks extension and accepts ``resultType: "task"``, following it to its end."""

    identifier = TASKS_EXTENSION

    def claims(self) -> list[ResultClaim[Any]]:
        async def resolve(created: CreateTaskResult, ctx: ClaimContext) -> CallToolResult:
            done = await follow(ctx.session, created.task_id, TERMINAL)
            assert done.result is not None, done
            return CallToolResult.model_validate(done.result)

        return [ResultClaim(result_type="task", model=CreateTaskResult, resolve=resolve)]
