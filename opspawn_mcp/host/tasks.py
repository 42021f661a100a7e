"""Downstream MCP Tasks (SEP-2663): a ``tools/call`` answered with a task is followed to its end.

See docs/host.md, "Downstream tasks (MCP Tasks, SEP-2663)".
"""

from __future__ import annotations

import logging

import anyio
import mcp.types as types
from mcp.client.extension import ClaimContext, ResultClaim
from mcp.client.session import ClientSession
from mcp.shared.dispatcher import ProgressFnT

from agentkit.progress import ToolProgress
from opspawn_mcp.mcp_tasks import wire
from opspawn_mcp.mcp_tasks.wire import TASKS_EXTENSION, CreateTaskResult, DetailedTask, Task

MIN_POLL_S = 0.05
"""A server asking for faster polling than this gets this: a poll loop must not spin."""
MAX_POLL_S = 5.0
"""Polls are at least this frequent, so a finished task is noticed within seconds."""
DEFAULT_POLL_S = 0.5
"""The interval when the server gives no ``pollIntervalMs``."""
logger = logging.getLogger("opspawn_mcp.host")

CANCEL_S = 5.0
"""How long leaving a task may wait for the server to acknowledge ``tasks/cancel``."""

__all__ = [
    "TASKS_EXTENSION",
    "TaskEnded",
    "TaskOverdue",
    "announce",
    "follow",
    "poll_interval_s",
    "task_claim",
]


class TaskOverdue(Exception):
    """The downstream task ran past ``task_timeout_s``; it was sent ``tasks/cancel``."""


class TaskEnded(Exception):
    """The downstream task ended without a result: failed, cancelled, or asking for input."""

    def __init__(self, task: DetailedTask) -> None:
        super().__init__(task.status)
        self.task = task


def poll_interval_s(task: Task) -> float:
    """The server's ``pollIntervalMs`` in seconds, held between ``MIN_POLL_S`` and ``MAX_POLL_S``."""
    if task.poll_interval_ms is None:
        return DEFAULT_POLL_S
    return min(MAX_POLL_S, max(MIN_POLL_S, task.poll_interval_ms / 1000))


async def follow(
    session: ClientSession,
    created: CreateTaskResult,
    *,
    poll_timeout_s: float,
    task_timeout_s: float,
    progress: ProgressFnT | None = None,
    server: str | None = None,
) -> types.CallToolResult:
    """Poll ``created`` until it is terminal and return its tool result.

    Raises ``TaskEnded`` for a task that failed, was cancelled or wants input (this host has no
    one to ask, so it cancels it), ``TaskOverdue`` past ``task_timeout_s``, ``TimeoutError`` when
    one ``tasks/get`` gets no answer within ``poll_timeout_s``, and the SDK's ``MCPError`` for a
    poll the server refuses. Any way out but a result sends ``tasks/cancel`` first, shielded and
    bounded, so cancelling the caller stops the downstream work too. With ``server`` (the pool's
    name for it), an agent's ``progress`` sink is first told the task's id (``announce``).
    """
    task: Task = created
    polled: DetailedTask | None = None
    polls = 0
    try:
        if server is not None:
            await announce(progress, server, created.task_id, _progress_text(created))
        with anyio.move_on_after(task_timeout_s) as overdue:
            while polled is None or not (polled.terminal or polled.status == "input_required"):
                await anyio.sleep(poll_interval_s(task))
                with anyio.fail_after(poll_timeout_s):
                    polled = await _get(session, task.task_id, poll_timeout_s)
                task, polls = polled, polls + 1
                if progress is not None:  # the agent's progress sink throttles these
                    await progress(polls, None, _progress_text(polled))
        if overdue.cancelled_caught or polled is None:
            raise TaskOverdue(task.task_id)
        if polled.status == "input_required":
            raise TaskEnded(polled)
    except BaseException:
        await _cancel(session, task.task_id)
        raise
    if polled.status != "completed" or polled.result is None:
        raise TaskEnded(polled)
    return types.CallToolResult.model_validate(polled.result)


async def announce(progress: ProgressFnT | None, server: str, task_id: str, message: str) -> None:
    """Tell an agent's progress sink which downstream task its call started, as soon as it
    exists: every later ``progress`` event of the call carries ``subtask: {server, task_id}``, so
    the opspawn task shows where its work went (an opspawn downstream's task id, with chaining)."""
    if isinstance(progress, ToolProgress):
        await progress.attach(message, subtask={"server": server, "task_id": task_id})


def _progress_text(task: Task) -> str:
    return f"downstream task {task.task_id} {task.status}" + (
        f": {task.status_message}" if task.status_message else ""
    )


async def _get(session: ClientSession, task_id: str, timeout_s: float) -> DetailedTask:
    request = wire.GetTaskRequest(params=wire.TaskIdParams(task_id=task_id))
    return await session.send_request(request, DetailedTask, request_read_timeout_seconds=timeout_s)


async def _cancel(session: ClientSession, task_id: str) -> None:
    """Best effort: a server that is gone or slow must not keep the caller; its task's TTL ends it."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_S):
        try:
            request = wire.CancelTaskRequest(params=wire.TaskIdParams(task_id=task_id))
            await session.send_request(request, types.EmptyResult, request_read_timeout_seconds=CANCEL_S)
        except Exception as exc:  # the task's own TTL, or the server's restart, ends it instead
            logger.info("tasks/cancel of downstream task %s failed: %s", task_id, exc)


def task_claim(poll_timeout_s: float, task_timeout_s: float) -> ResultClaim[CreateTaskResult]:
    """The claim a ``ClientSession`` needs to accept ``resultType: "task"`` (at 2026-07-28 only).

    Its resolver is ``follow``, so an SDK ``Client`` built with it drives tasks the same way the
    pool does (the pool calls ``follow`` itself, to pass progress and map errors).
    """

    async def resolve(created: CreateTaskResult, ctx: ClaimContext) -> types.CallToolResult:
        return await follow(
            ctx.session, created, poll_timeout_s=poll_timeout_s, task_timeout_s=task_timeout_s
        )

    return ResultClaim(result_type="task", model=CreateTaskResult, resolve=resolve)
