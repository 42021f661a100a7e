"""The recovery loop: no accepted task is lost, whatever dies.

Delivery is at least once and the store is the truth, so recovery never trusts the broker:

* **Expired leases.** A running task whose lease ran out belongs to a worker that died or
  stalled. Periodically, ``store.expired()`` lists them; each is re-enqueued, and the actor's
  ``claim`` (a compare-and-set that accepts only an expired lease) decides who runs it next.
  Many recovery loops may enqueue the same id: duplicates are no-ops. A task that has used up
  ``max_attempts`` is failed here with "gave up after N attempts: ..." instead.
* **Lost messages.** On start, ``queued`` tasks older than ``STALE_QUEUED_S`` are re-enqueued:
  a broker restart without persistence, a publish that failed after the task was stored, or an
  embedded server that stopped with work in its in-memory queue. Younger ones have a message in
  flight and are left alone. This runs at start only: a long backlog legitimately stays queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from opspawn_mcp.errors import IllegalTransition, OpspawnError
from opspawn_mcp.models import TaskStatus, utcnow
from opspawn_mcp.store.base import TaskStore

log = logging.getLogger(__name__)

STALE_QUEUED_S = 5.0
LEASE_LOST_REASON = (
    "the worker running it stopped renewing its lease (it crashed, was killed or stalled); "
    "check the worker logs"
)

Enqueue = Callable[[str], Awaitable[None]]


def gave_up_reason(attempts: int, last: str | None) -> str:
    return f"gave up after {attempts} attempts: {last or LEASE_LOST_REASON}"


def recovery_interval(lease_ttl_s: float) -> float:
    """Half a lease: a dead worker's task waits at most ~1.5 leases before it runs again."""
    return min(max(lease_ttl_s / 2, 0.2), 30.0)


async def give_up(store: TaskStore, task_id: str, attempts: int, last: str | None, owner: str | None) -> bool:
    """Fail a task that used all its attempts; False if someone else moved it first."""
    reason = gave_up_reason(attempts, last)
    try:
        await store.transition(
            task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING}, TaskStatus.FAILED, error=reason, owner=owner
        )
    except IllegalTransition:
        return False
    log.warning("task %s failed: %s", task_id, reason)
    return True


async def recover_expired(store: TaskStore, enqueue: Enqueue, max_attempts: int) -> int:
    """One pass over expired leases; returns how many tasks were re-enqueued or failed."""
    handled = 0
    for task in await store.expired():
        if task.attempts >= max_attempts:
            if await give_up(store, task.id, task.attempts, None, task.lease_owner):
                handled += 1
            continue
        log.info("task %s: lease of %s expired, re-enqueueing", task.id, task.lease_owner)
        await enqueue(task.id)
        handled += 1
    return handled


async def requeue_stale(store: TaskStore, enqueue: Enqueue, older_than_s: float = STALE_QUEUED_S) -> int:
    """Re-enqueue every ``queued`` task created more than ``older_than_s`` ago."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    cursor: str | None = None
    count = 0
    while True:
        page = await store.list(TaskStatus.QUEUED, limit=200, cursor=cursor)
        for task in page.items:
            if task.created_at < cutoff:
                await enqueue(task.id)
                count += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    if count:
        log.info("re-enqueued %d queued task(s) whose message may have been lost", count)
    return count


async def recovery_loop(store: TaskStore, enqueue: Enqueue, max_attempts: int, interval_s: float) -> None:
    """Run ``recover_expired`` forever; a failing pass (store down) is logged and retried."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await recover_expired(store, enqueue, max_attempts)
        except (OpspawnError, OSError) as exc:
            log.warning("recovery pass failed, retrying in %.1fs: %s", interval_s, exc)
        except Exception:
            log.exception("recovery pass failed unexpectedly, retrying in %.1fs", interval_s)
