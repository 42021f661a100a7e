"""The Scheduler: turns an accepted ``TaskSpec`` into a ``queued`` task in the store and a message.

Persist, then enqueue, then mark the task enqueued (the outbox), so an accepted task is never
lost. See docs/workers.md, "Recovery: no accepted task is lost".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from opspawn_mcp.models import Task, TaskSpec
from opspawn_mcp.store.base import TaskStore

log = logging.getLogger(__name__)


class Enqueuer(Protocol):
    """Hands a task id to whatever runs tasks (Dramatiq over RabbitMQ, or the embedded broker).

    Implementations must be safe to call more than once for one id: the recovery loop may
    re-enqueue a task whose first message was in fact delivered, and the actor is idempotent.
    """

    async def enqueue(self, task_id: str) -> None: ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` when tasks cannot be handed on (readiness checks)."""


class Scheduler:
    """Persists and enqueues. It does not validate: ``TaskService`` has already done that."""

    def __init__(self, store: TaskStore, enqueuer: Enqueuer) -> None:
        self._store = store
        self._enqueuer = enqueuer

    async def schedule(self, spec: TaskSpec, *, principal: str, idempotency_key: str | None = None) -> Task:
        """Store ``principal``'s task as ``queued``, then enqueue its id; return the stored task.

        An enqueue failure is logged, not raised: the task is already accepted and durable, and
        the recovery loop will enqueue it again. Raising here would tell the client the task was
        refused while it may still run. A taken ``idempotency_key`` raises the store's
        ``KeyTaken`` before anything is written or published.
        """
        # ``create`` writes the ``queued`` state event in its own transaction: one round trip.
        task = await self._store.create(Task(spec=spec, principal=principal, idempotency_key=idempotency_key))
        await publish(self._store, self._enqueuer.enqueue, task.id)
        return task


async def publish(store: TaskStore, enqueue: Callable[[str], Awaitable[None]], task_id: str) -> bool:
    """Hand the task's id to the broker and mark it enqueued once the broker confirmed it.

    This is the outbox: a task whose mark is missing (the broker was down, or this process died
    between the two steps) is published again by the recovery loop (``store.unenqueued``), and a
    marked one never is, so a backlog is never re-published. A failure is logged, not raised:
    the task is accepted and durable either way. False: it stays for the recovery loop.
    """
    try:
        await enqueue(task_id)
    except Exception as exc:
        log.warning("enqueue of task %s failed (%s); the recovery loop will publish it", task_id, exc)
        return False
    try:
        await store.mark_enqueued(task_id)
    except Exception as exc:
        # Published but not marked: the recovery loop may publish it once more (a duplicate
        # message is a no-op for the actor).
        log.warning("task %s published but not marked (%s)", task_id, exc)
    return True
