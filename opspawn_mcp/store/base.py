"""The Metadata Store contract: one async protocol, three implementations (memory, SQLite, PostgreSQL).

The store is the truth about a task; broker messages carry only ids. Every status change goes
through ``transition``, a compare-and-set that also checks ``TaskStatus.can_become``, so two
workers (or a worker and a cancel) can never both finish one task: exactly one wins, the other
gets ``IllegalTransition``.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from datetime import datetime
from typing import Any, Protocol

from opspawn_mcp.models import Task, TaskEvent, TaskPage, TaskStatus, Usage


class TaskStore(Protocol):
    async def start(self) -> None:
        """Connect and create or migrate the schema (idempotent)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` when the store cannot be reached (used by readiness checks)."""

    async def create(self, task: Task) -> Task: ...

    async def get(self, task_id: str) -> Task:
        """Raise ``TaskNotFound`` for an unknown id."""

    async def list(
        self,
        status: TaskStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
        *,
        principal: str | None = None,
    ) -> TaskPage:
        """Newest first; ``cursor`` is the opaque ``next_cursor`` of the previous page;
        ``principal`` keeps only that principal's tasks (None: everyone's)."""

    async def count_active(self, principal: str) -> int:
        """How many of ``principal``'s tasks are queued or running (its tasks in flight)."""

    async def transition(
        self,
        task_id: str,
        expected: Collection[TaskStatus],
        new: TaskStatus,
        *,
        result: str | None = None,
        error: str | None = None,
        usage: Usage | None = None,
        owner: str | None = None,
        reason: str | None = None,
    ) -> Task:
        """Atomically move the task to ``new`` if its status is in ``expected`` and the move is
        legal (and, when ``owner`` is given, the task's lease belongs to ``owner``).

        In the same transaction it appends the ``state`` event ``{"status": new, "reason": ...}``
        (``reason`` defaults to ``error``), so a reader that sees the new status also sees its
        event: a watcher that stops at a terminal status never misses the final state event.

        Sets ``started_at`` on entering running and ``finished_at`` on a terminal state; leaving
        running clears the lease. Raises ``TaskNotFound`` or ``IllegalTransition``.
        """

    async def claim(self, task_id: str, owner: str, ttl_s: float, max_attempts: int) -> Task | None:
        """Take the task for ``owner``: ``queued -> running``, or a ``running`` task whose lease
        has expired. Counts an attempt and sets the lease. Returns None if someone else holds it,
        it is terminal, or it has reached ``max_attempts`` (the caller then fails it)."""

    async def renew(self, task_id: str, owner: str, ttl_s: float) -> bool:
        """Extend the lease if ``owner`` still holds it; False means the task was lost."""

    async def expired(self, now: datetime | None = None, limit: int = 100) -> builtins.list[Task]:
        """Running tasks whose lease expired before ``now``: the recovery loop re-runs them."""

    async def record_progress(self, task_id: str, steps: int, usage: Usage) -> None:
        """Store the step count and token usage so far (shown by get_status while running)."""

    async def append_event(self, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:
        """Append with the next ``seq`` for that task (1, 2, 3...), unique even under races.

        Once the task is terminal only ``state`` events are accepted; anything else raises
        ``Conflict`` (checked under the same lock as the append, so it cannot race a cancel)."""

    async def events(
        self, task_id: str, after_seq: int = 0, limit: int = 1000
    ) -> builtins.list[TaskEvent]: ...
