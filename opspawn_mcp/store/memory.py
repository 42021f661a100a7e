"""An in-process store with exactly the SQL store's semantics, for ``memory://`` and the unit tests.

One lock makes every method atomic; tasks are copied in and out.
See docs/architecture.md, "The store is the truth".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from opspawn_mcp.errors import Conflict, IllegalTransition, TaskNotFound, Unavailable
from opspawn_mcp.models import ExposedCall, Task, TaskEvent, TaskStatus, Usage, utcnow
from opspawn_mcp.store._common import as_utc, check_log_open, lease_until, state_event
from opspawn_mcp.store.base import JournalKeyTaken, JournalRow, KeyTaken, Move, Progress, TaskStore, Window
from opspawn_mcp.store.changes import ChangeHub


class MemoryStore(TaskStore):
    """``TaskStore`` in a dict. Nothing survives ``close()`` or the process."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._tasks: dict[str, Task] = {}
        self._logs: dict[str, list[TaskEvent]] = {}
        self._journal: dict[str, dict[tuple[str, int], JournalRow]] = {}
        self._calls: dict[str, ExposedCall] = {}
        self._keys: dict[tuple[str, str], str] = {}
        """(principal, idempotency key) -> task id."""
        self._closed = False
        self.changes = ChangeHub()

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        self.changes.wake_all()

    async def ping(self) -> None:
        if self._closed:
            raise Unavailable("The in-memory task store is closed; restart the server.")

    def _get(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def create(self, task: Task) -> Task:
        async with self._lock:
            if task.id in self._tasks:
                raise Conflict(f"A task with id {task.id!r} already exists; create it with a new id.")
            if task.idempotency_key is not None:
                holder = self._by_key(task.principal, task.idempotency_key)
                if holder is not None:
                    raise KeyTaken(holder.model_copy(deep=True))
            stored = _normalised(task)
            self._tasks[stored.id] = stored
            if stored.idempotency_key is not None:
                self._keys[(stored.principal, stored.idempotency_key)] = stored.id
            self._logs[stored.id] = []
            self._journal[stored.id] = {}
            self._append(stored.id, "state", state_event(stored.status, None))
        self.changes.notify(stored.id, 1)
        return stored.model_copy(deep=True)

    async def get(self, task_id: str) -> Task:
        async with self._lock:
            return self._get(task_id).model_copy(deep=True)

    def _by_key(self, principal: str, key: str) -> Task | None:
        task_id = self._keys.get((principal, key))
        return None if task_id is None else self._tasks[task_id]

    async def get_by_key(self, principal: str, key: str) -> Task | None:
        async with self._lock:
            found = self._by_key(principal, key)
            return None if found is None else found.model_copy(deep=True)

    async def _list_tasks(self, window: Window) -> list[Task]:
        text = window.goal_contains.lower()
        async with self._lock:
            rows = [t for t in self._tasks.values() if _matches(t, window) and text in t.spec.goal.lower()]
        return _newest_first(rows, lambda t: (t.created_at, t.id), window)

    async def mark_enqueued(self, task_id: str) -> None:
        async with self._lock:
            task = self._tasks.get(task_id)
            if task is not None and task.status is TaskStatus.QUEUED:
                self._tasks[task_id] = task.model_copy(update={"enqueued_at": utcnow()})

    async def _unenqueued(self, cutoff: datetime, limit: int) -> list[str]:
        async with self._lock:
            rows = [
                t
                for t in self._tasks.values()
                if t.status is TaskStatus.QUEUED and t.enqueued_at is None and t.created_at < cutoff
            ]
        rows.sort(key=lambda t: (t.created_at, t.id))
        return [t.id for t in rows[:limit]]

    async def count_active(self, principal: str) -> int:
        async with self._lock:
            return sum(1 for t in self._tasks.values() if t.principal == principal and not t.status.terminal)

    async def count_by_status(self) -> dict[TaskStatus, int]:
        async with self._lock:
            statuses = [t.status for t in self._tasks.values()]
        return {status: statuses.count(status) for status in TaskStatus}

    async def _move(self, move: Move) -> Task:
        async with self._lock:
            task = self._get(move.task_id)
            if task.status not in move.allowed or (move.owner is not None and task.lease_owner != move.owner):
                raise IllegalTransition(move.task_id, task.status.value, move.new.value)
            self._check_entries(move.task_id, move.entries)
            values = dict(move.values)
            for name in ("usage", "approval"):
                if values.get(name) is not None:
                    values[name] = values[name].model_copy(deep=True)
            if move.refund:
                values["attempts"] = task.attempts - 1
            updated = task.model_copy(update=values)
            self._tasks[move.task_id] = updated
            self._insert_entries(move.task_id, move.entries)
            if move.event is not None:
                self._append(move.task_id, *move.event)
            written = self._append(move.task_id, "state", move.state)
        self.changes.notify(move.task_id, written.seq)
        return updated.model_copy(deep=True)

    async def claim(self, task_id: str, owner: str, ttl_s: float, max_attempts: int) -> Task | None:
        async with self._lock:
            now = utcnow()
            until = lease_until(now, ttl_s)
            task = self._get(task_id)
            if not _claimable(task, now, max_attempts):
                return None
            updated = task.model_copy(
                update={
                    "status": TaskStatus.RUNNING,
                    "lease_owner": owner,
                    "lease_expires_at": until,
                    "attempts": task.attempts + 1,
                    "started_at": now,
                }
            )
            self._tasks[task_id] = updated
            return updated.model_copy(deep=True)

    async def renew(self, task_id: str, owner: str, ttl_s: float) -> bool:
        async with self._lock:
            now = utcnow()
            until = lease_until(now, ttl_s)
            task = self._tasks.get(task_id)
            if task is None or task.status is not TaskStatus.RUNNING or task.lease_owner != owner:
                return False
            self._tasks[task_id] = task.model_copy(update={"lease_expires_at": until})
            return True

    async def renew_many(self, leases: Mapping[str, str], ttl_s: float) -> set[str]:
        async with self._lock:
            until = lease_until(utcnow(), ttl_s)
            held: set[str] = set()
            for task_id, owner in leases.items():
                task = self._tasks.get(task_id)
                if task is not None and task.status is TaskStatus.RUNNING and task.lease_owner == owner:
                    self._tasks[task_id] = task.model_copy(update={"lease_expires_at": until})
                    held.add(task_id)
            return held

    async def _past_deadline(self, status: TaskStatus, cutoff: datetime, limit: int) -> list[Task]:
        deadline = _DEADLINES[status]
        async with self._lock:
            rows = [
                t for t in self._tasks.values() if t.status is status and (deadline(t) or cutoff) < cutoff
            ]
        rows.sort(key=lambda t: (deadline(t) or cutoff, t.id))
        return [t.model_copy(deep=True) for t in rows[:limit]]

    async def record_progress(self, task_id: str, steps: int, usage: Usage) -> None:
        async with self._lock:
            task = self._get(task_id)
            self._tasks[task_id] = task.model_copy(update={"steps": steps, "usage": usage.model_copy()})

    async def _append_event(self, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:
        async with self._lock:
            check_log_open(task_id, self._get(task_id).status, kind)
            event = self._append(task_id, kind, data)
        self.changes.notify(task_id, event.seq)
        return event

    async def _record(self, progress: Progress) -> TaskEvent | None:
        task_id = progress.task_id
        async with self._lock:
            task = self._get(task_id)
            if task.status is not TaskStatus.RUNNING or task.lease_owner != progress.owner:
                return None
            self._check_entries(task_id, progress.entries)
            # Every check is done: from here on all three writes happen, as in one transaction.
            event = self._append(task_id, progress.kind, progress.data)
            update = {"steps": progress.steps, "usage": progress.usage.model_copy()}
            self._tasks[task_id] = task.model_copy(update=update)
            self._insert_entries(task_id, progress.entries)
        self.changes.notify(task_id, event.seq)
        return event

    def _check_entries(self, task_id: str, entries: Sequence[JournalRow]) -> None:
        """Under the caller's lock: refuse a key that exists (or repeats), before any write."""
        seen = set(self._journal.get(task_id, {}))
        for row in entries:
            if (row.kind, row.ordinal) in seen:
                raise JournalKeyTaken(task_id, row)
            seen.add((row.kind, row.ordinal))

    def _insert_entries(self, task_id: str, entries: Sequence[JournalRow]) -> None:
        journal = self._journal.setdefault(task_id, {})
        for row in entries:
            journal[(row.kind, row.ordinal)] = row.model_copy(deep=True)

    async def journal(self, task_id: str) -> list[JournalRow]:
        async with self._lock:
            self._get(task_id)
            rows = list(self._journal.get(task_id, {}).values())
        rows.sort(key=lambda r: r.order)
        return [r.model_copy(deep=True) for r in rows]

    def _append(self, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:
        """Append under the caller's lock."""
        log = self._logs.setdefault(task_id, [])
        event = TaskEvent.model_validate(
            {"task_id": task_id, "seq": len(log) + 1, "time": utcnow(), "kind": kind, "data": data}
        )
        # Stored as a deep copy so later mutation of ``data`` by the caller changes nothing.
        log.append(event.model_copy(deep=True))
        return event

    async def wait_for_change(self, task_id: str, seq: int, timeout_s: float) -> bool:
        # The log is right here, so a write between the caller's read and this call is seen
        # exactly (no await between this check and parking), not only through the hub's memory.
        if len(self._logs.get(task_id, ())) > seq:
            return True
        return await self.changes.wait(task_id, seq, timeout_s)

    async def _events(self, task_id: str, after_seq: int, limit: int) -> list[TaskEvent]:
        async with self._lock:
            self._get(task_id)
            log = self._logs.get(task_id, [])
            return [e.model_copy(deep=True) for e in log[max(after_seq, 0) :][:limit]]

    async def record_call(self, call: ExposedCall) -> None:
        async with self._lock:
            if call.id in self._calls:
                raise Conflict(f"An exposed call with id {call.id!r} is already recorded.")
            self._calls[call.id] = call.model_copy(update={"at": as_utc(call.at)}, deep=True)

    async def _list_calls(self, window: Window) -> list[ExposedCall]:
        async with self._lock:
            rows = [c for c in self._calls.values() if _matches(c, window)]
        return _newest_first(rows, lambda c: (c.at, c.id), window)


def _normalised(task: Task) -> Task:
    """A copy with every timestamp aware UTC, as the SQL store would read it back."""
    stored = task.model_copy(deep=True)
    for name in ("created_at", "started_at", "finished_at", "lease_expires_at"):
        value = getattr(stored, name)
        if value is not None:
            setattr(stored, name, as_utc(value))
    return stored


# Each status with a deadline, and where a task in it keeps it: its lease, its approval request.
_DEADLINES: dict[TaskStatus, Callable[[Task], datetime | None]] = {
    TaskStatus.RUNNING: lambda t: t.lease_expires_at,
    TaskStatus.INPUT_REQUIRED: lambda t: t.approval.expires_at if t.approval is not None else None,
}


def _claimable(task: Task, now: datetime, max_attempts: int) -> bool:
    """Queued, or running with a lease that ran out, and attempts left: the claim's WHERE clause."""
    if task.attempts >= max_attempts:
        return False
    if task.status is TaskStatus.QUEUED:
        return True
    return (
        task.status is TaskStatus.RUNNING
        and task.lease_expires_at is not None
        and task.lease_expires_at < now
    )


_Row = TypeVar("_Row", Task, ExposedCall)


def _matches(row: Task | ExposedCall, window: Window) -> bool:
    return all(getattr(row, name) == value for name, value in window.match.items())


def _newest_first(
    rows: list[_Row], key: Callable[[_Row], tuple[datetime, str]], window: Window
) -> list[_Row]:
    """``window``'s rows (copies), newest ``key`` first, as the SQL store reads them."""
    rows = sorted((r for r in rows if window.after is None or key(r) < window.after), key=key, reverse=True)
    return [r.model_copy(deep=True) for r in rows[: window.limit + 1]]
