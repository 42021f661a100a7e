"""The recovery loop: no accepted task is lost, whatever dies.

Expired leases, unconfirmed messages (the outbox), unanswered approvals and the embedded
worker's lost queue. See docs/workers.md, "Recovery: no accepted task is lost".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from opspawn_mcp.approvals import time_out_approvals
from opspawn_mcp.errors import IllegalTransition, OpspawnError
from opspawn_mcp.models import TaskStatus, utcnow
from opspawn_mcp.scheduler import publish
from opspawn_mcp.store.base import TaskStore

log = logging.getLogger(__name__)

LEASE_LOST_REASON = (
    "the worker running it stopped renewing its lease (it crashed, was killed or stalled); "
    "check the worker logs"
)

Enqueue = Callable[[str], Awaitable[None]]
Run = Callable[[str], Awaitable[None]]
"""Start running a task in this process (in the background) and return."""


GAVE_UP_PREFIX = "gave up after"
"""How a task's error begins when every attempt's worker died (MCP Tasks: ``failed``)."""


def gave_up_reason(attempts: int, last: str | None) -> str:
    return f"{GAVE_UP_PREFIX} {attempts} attempts: {last or LEASE_LOST_REASON}"


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


async def recover_expired(store: TaskStore, run: Run, max_attempts: int) -> int:
    """One pass over expired leases; returns how many tasks were resumed here or failed.

    A task is resumed by this process at once (``run`` claims it and starts it in the
    background), not re-published behind the queue's backlog: recovery takes at most a lease
    plus one interval, whatever is queued. Many recovery loops may find the same task; the
    claim's compare-and-set lets exactly one of them run it.
    """
    handled = 0
    for task in await store.expired():
        if task.attempts >= max_attempts:
            if await give_up(store, task.id, task.attempts, None, task.lease_owner):
                handled += 1
            continue
        log.info("task %s: lease of %s expired, resuming it here", task.id, task.lease_owner)
        await run(task.id)
        handled += 1
    return handled


async def requeue_stale(store: TaskStore, enqueue: Enqueue, older_than_s: float = 0.0) -> int:
    """Re-enqueue every ``queued`` task created more than ``older_than_s`` ago."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    cursor: str | None = None
    count = 0
    while True:
        page = await store.list_tasks(TaskStatus.QUEUED, limit=200, cursor=cursor)
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


async def publish_unconfirmed(store: TaskStore, enqueue: Enqueue, older_than_s: float) -> int:
    """One pass over the outbox: publish queued tasks no broker confirmed (``store.unenqueued``),
    oldest first; returns how many were published. Confirmed ones are never published again."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    published = 0
    for task_id in await store.unenqueued(cutoff):
        if not await publish(store, enqueue, task_id):
            break  # the broker is still down: the next pass tries again
        published += 1
    if published:
        log.info("published %d queued task(s) whose message was never confirmed", published)
    return published


async def recovery_loop(
    store: TaskStore, run: Run, enqueue: Enqueue, max_attempts: int, interval_s: float
) -> None:
    """Every ``interval_s``: resume expired leases here, time out unanswered approvals and publish
    unconfirmed tasks; a failing pass (store or broker down) is logged and retried."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await recover_expired(store, run, max_attempts)
            await time_out_approvals(store, enqueue)
            await publish_unconfirmed(store, enqueue, older_than_s=interval_s)
        except (OpspawnError, OSError) as exc:
            log.warning("recovery pass failed, retrying in %.1fs: %s", interval_s, exc)
        except Exception:
            log.exception("recovery pass failed unexpectedly, retrying in %.1fs", interval_s)
