"""Rules both store implementations share, so memory and SQL cannot drift apart.

Every decision (the fields a transition sets, cursors, event kinds, limits) is made here once.
See docs/architecture.md, "The store is the truth".
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from opspawn_mcp.errors import Conflict, InvalidInput
from opspawn_mcp.models import ApprovalRequest, EventKind, TaskStatus, Usage

EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))
MAX_PAGE = 1000


def as_utc(value: datetime) -> datetime:
    """Aware UTC in, aware UTC out; a naive value is taken to be UTC (that is how SQLite stores it)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def allowed_from(expected: Collection[TaskStatus], new: TaskStatus) -> list[TaskStatus]:
    """The subset of ``expected`` from which ``new`` is legal: the compare-and-set's WHERE clause.

    Filtering here means an illegal move can never succeed even if the caller lists a
    status it should not have, because ``can_become`` is the single state machine.
    """
    return sorted({TaskStatus(s) for s in expected if TaskStatus(s).can_become(new)})


def transition_values(
    new: TaskStatus,
    now: datetime,
    *,
    result: str | None,
    error: str | None,
    usage: Usage | None,
    approval: ApprovalRequest | None = None,
    warning: str | None = None,
) -> dict[str, Any]:
    """Column values a successful transition writes (``usage`` and ``approval`` still as models).

    A task holds an approval request exactly while it is ``input_required``: entering that state
    needs one, every other transition clears it.
    """
    if (approval is not None) != (new is TaskStatus.INPUT_REQUIRED):
        raise ValueError(f"a transition to {new.value} takes an approval request iff it pauses the task")
    values: dict[str, Any] = {"status": new, "approval": approval}
    if new is TaskStatus.RUNNING:
        values["started_at"] = now
    else:
        # Leaving running releases the lease, so the recovery loop and other workers
        # stop treating the task as owned.
        values["lease_owner"] = None
        values["lease_expires_at"] = None
    if new is TaskStatus.QUEUED:
        # Back in the queue (recovery, shutdown): it needs a new message, confirmed anew.
        values["enqueued_at"] = None
    if new.terminal:
        values["finished_at"] = now
    if result is not None:
        values["result"] = result
    if error is not None:
        values["error"] = error
    if usage is not None:
        values["usage"] = usage
    if warning is not None:
        values["warning"] = warning
    return values


def gives_back_attempt(new: TaskStatus) -> bool:
    """A pause is not a failed attempt: the claim's attempt is returned, so a task may wait for
    any number of approvals without running out of ``max_attempts``."""
    return new is TaskStatus.INPUT_REQUIRED


def approval_document(approval: ApprovalRequest | None) -> dict[str, Any] | None:
    """The stored form of a request: its view plus the internal journal key."""
    if approval is None:
        return None
    return {**approval.model_dump(mode="json"), "tool_call": approval.tool_call, "step": approval.step}


def lease_until(now: datetime, ttl_s: float) -> datetime:
    if ttl_s <= 0:
        raise InvalidInput(f"A lease needs a positive ttl_s, got {ttl_s}.")
    return now + timedelta(seconds=ttl_s)


def check_kind(kind: str) -> None:
    if kind not in EVENT_KINDS:
        raise InvalidInput(f"Unknown event kind {kind!r}; use one of {', '.join(sorted(EVENT_KINDS))}.")


def state_event(new: TaskStatus, reason: str | None) -> dict[str, Any]:
    """The ``state`` event a transition writes with itself: the new status and why."""
    return {"status": new.value} if reason is None else {"status": new.value, "reason": reason}


def check_log_open(task_id: str, status: TaskStatus, kind: str) -> None:
    """A finished task's log is closed to everything but its own state events, so a worker whose
    agent was mid-step when the task was cancelled cannot write after the final ``state`` event,
    and a watcher that stops at that event misses nothing."""
    if status.terminal and kind != "state":
        raise Conflict(f"Task {task_id} is {status.value}; its event log is closed.", task_id=task_id)


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}, got {limit}.")


def encode_cursor(created_at: datetime, task_id: str) -> str:
    """Opaque to clients, but just ``(created_at, id)`` of the last row: keyset pagination,
    so a page stays correct while new tasks arrive (an offset would shift under them)."""
    raw = json.dumps([as_utc(created_at).isoformat(), task_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, task_id = json.loads(raw)
        if not isinstance(created, str) or not isinstance(task_id, str):
            raise ValueError(cursor)
        return as_utc(datetime.fromisoformat(created)), task_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "The cursor is not one this server issued; pass the next_cursor of the previous page, "
            "or omit it to start from the newest task."
        ) from exc
