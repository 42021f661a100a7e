"""An opspawn downstream's ``submit_task`` followed without MCP Tasks (the 2025-11-25 wire).

Submit with ``wait: 0``, poll ``get_status``, ``cancel_task`` on any way out but an answer.
See docs/composition.md, "Chaining: opspawn B as a server of opspawn A".
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import mcp.types as types
from mcp.client.session import ClientSession
from mcp.shared.dispatcher import ProgressFnT

from opspawn_mcp.host.tasks import CANCEL_S, TaskOverdue, announce

logger = logging.getLogger("opspawn_mcp.host")

SUBMIT = "submit_task"
POLL_S = 1.0
"""How often ``get_status`` is asked; opspawn's own MCP Tasks poll interval."""


class SubtaskEnded(Exception):
    """The sub-task ended without an answer (cancelled there, or waiting for a person); the
    message is what the agent reads."""


def follows(tool: str, opspawn: bool) -> bool:
    """Whether a call of ``tool`` on a server (an opspawn or not) is a delegation to follow."""
    return tool == SUBMIT and opspawn


def submit_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The agent's arguments with ``wait: 0``: the pool waits, by polling, not B's call."""
    return {**arguments, "wait": 0}


def _view(result: types.CallToolResult) -> dict[str, Any] | None:
    view = result.structured_content
    return view if isinstance(view, dict) and isinstance(view.get("task_id"), str) else None


def _line(view: dict[str, Any]) -> str:
    steps = (view.get("progress") or {}).get("steps", 0)
    return f"downstream task {view['task_id']} {view.get('status')}, {steps} step(s) taken"


async def follow_submitted(
    session: ClientSession,
    submitted: types.CallToolResult,
    *,
    server: str,
    poll_timeout_s: float,
    task_timeout_s: float,
    progress: ProgressFnT | None,
) -> types.CallToolResult:
    """Poll the task ``submitted`` names until it ends; its answer as a tool result.

    A refusal (``isError``) or a result that names no task is returned as it is. Raises
    ``SubtaskEnded`` for a task cancelled on the server or waiting for input (it is cancelled:
    nobody here can answer it), ``TaskOverdue`` past ``task_timeout_s``, and what a call raises
    (``MCPError``, a timeout) for a poll that fails.
    """
    view = _view(submitted)
    if submitted.is_error or view is None:
        return submitted
    task_id: str = view["task_id"]
    polls = 0
    try:
        await announce(progress, server, task_id, _line(view))
        with anyio.move_on_after(task_timeout_s) as overdue:
            while not view.get("done") and view.get("status") != "input_required":
                await anyio.sleep(POLL_S)
                polled = await session.call_tool(
                    "get_status", {"task_id": task_id}, read_timeout_seconds=poll_timeout_s
                )
                seen = None if polled.is_error else _view(polled)
                if seen is None:
                    raise SubtaskEnded(
                        f"MCP server {server!r} cannot show its task {task_id}: {_text(polled)}"
                    )
                view, polls = seen, polls + 1
                if progress is not None:
                    await progress(polls, None, _line(view))
        if overdue.cancelled_caught:
            raise TaskOverdue(task_id)
        if view.get("status") == "input_required":
            raise SubtaskEnded(
                f"MCP server {server!r} ran {SUBMIT!r} as task {task_id}, which asked for input opspawn "
                "cannot give a downstream task, so it was cancelled."
            )
    except BaseException:
        await _cancel(session, task_id)
        raise
    return _answer(server, view)


def _answer(server: str, view: dict[str, Any]) -> types.CallToolResult:
    status = view.get("status")
    if status == "completed":
        text, error = view.get("result") or "", False
    elif status == "failed":
        text, error = view.get("error") or "the agent failed", True
    else:
        reason = f": {view['error']}" if view.get("error") else ""
        raise SubtaskEnded(
            f"MCP server {server!r} ran {SUBMIT!r} as task {view['task_id']}, which was cancelled on the "
            f"server{reason}."
        )
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], is_error=error, structured_content=view
    )


def _text(result: types.CallToolResult) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def _cancel(session: ClientSession, task_id: str) -> None:
    """``cancel_task``, shielded and bounded like ``tasks/cancel``; a failure is only logged."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_S):
        try:
            await session.call_tool("cancel_task", {"task_id": task_id}, read_timeout_seconds=CANCEL_S)
        except Exception as exc:
            logger.info("cancel_task of downstream task %s failed: %s", task_id, exc)
