"""Approvals: the request a paused task shows, and the answer (or timeout) that resumes it.

The pause, an answer and a timeout are each one store transaction, and an answer re-queues the
task through the outbox. See docs/approvals.md, "What happens".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import agentkit
from opspawn_mcp.agent_factory import call_target
from opspawn_mcp.errors import Conflict
from opspawn_mcp.models import ApprovalAnswer, ApprovalRequest, Task, TaskStatus, utcnow
from opspawn_mcp.scheduler import publish
from opspawn_mcp.store.base import JournalRow, TaskStore

log = logging.getLogger(__name__)

Enqueue = Callable[[str], Awaitable[None]]
MAX_ARGUMENTS_SHOWN = 500
"""Characters of the call's arguments quoted in the request's message (all are in ``arguments``)."""


def approval_request(task: Task, pending: agentkit.PendingApproval, timeout_s: float) -> ApprovalRequest:
    """The request for the call a run stopped at; its id is unique to this task and call."""
    target = call_target(pending.call)
    server, tool, arguments = (
        target if target is not None else ("", pending.call.name, pending.call.arguments)
    )
    shown = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    if len(shown) > MAX_ARGUMENTS_SHOWN:
        shown = shown[:MAX_ARGUMENTS_SHOWN] + "..."
    now = utcnow()
    return ApprovalRequest(
        id=f"{task.id}-{pending.ordinal}",
        server=server,
        tool=tool,
        arguments=arguments,
        message=(
            f"The agent wants to call {tool} on server {server} with {shown}. This server's config "
            f"requires a person's approval for it; unanswered within {timeout_s:g} s it is denied."
        ),
        requested_at=now,
        expires_at=now + timedelta(seconds=timeout_s),
        tool_call=pending.ordinal,
        step=pending.step,
    )


def timed_out_answer(request: ApprovalRequest) -> ApprovalAnswer:
    waited = (request.expires_at - request.requested_at).total_seconds() if request.expires_at else 0.0
    return ApprovalAnswer(approve=False, note=f"no answer within {waited:g} s")


async def settle(
    store: TaskStore, enqueue: Enqueue, task: Task, answer: ApprovalAnswer, by: str | None
) -> Task:
    """Record the answer to ``task``'s pending request and re-enqueue the task.

    Raises ``Conflict`` when the task is no longer waiting on that request (another answer, a
    timeout or a cancel got there first): the state compare-and-set and the journal key, which
    exists once per tool call, each refuse a second answer.
    """
    request = task.approval
    if task.status is not TaskStatus.INPUT_REQUIRED or request is None:
        raise Conflict(f"Task {task.id} is {task.status.value}; it waits for no answer.", task_id=task.id)
    approval = agentkit.Approval(approved=answer.approve, by=by, note=answer.note)
    row = JournalRow(
        kind="approval",
        ordinal=request.tool_call,
        step=request.step,
        attempt=task.attempts,
        data=approval.model_dump(mode="json"),
    )
    verdict = "approved" if answer.approve else "denied"
    reason = f"{verdict} by {by}" if by else verdict
    event = {"request_id": request.id, "approve": answer.approve, "note": answer.note, "by": by}
    resumed = await store.transition(
        task.id,
        {TaskStatus.INPUT_REQUIRED},
        TaskStatus.QUEUED,
        reason=f"{reason}: {answer.note}" if answer.note else reason,
        event=("input_answered", event),
        entries=[row],
    )
    await publish(store, enqueue, task.id)
    return resumed


async def time_out_approvals(store: TaskStore, enqueue: Enqueue, now: datetime | None = None) -> int:
    """One pass over requests expired by ``now``: each is answered "denied" (nobody answered
    within ``opspawn.approvals.timeout_s``); returns how many. Losing a race to a person is fine."""
    handled = 0
    for task in await store.expired_approvals(now):
        if task.approval is None:
            continue
        try:
            await settle(store, enqueue, task, timed_out_answer(task.approval), None)
        except Conflict:
            continue
        log.info("task %s: approval request %s timed out; denied", task.id, task.approval.id)
        handled += 1
    return handled
