"""Waiting on a task through its store, as a client of a worker in another task or process must.

The worker may be another process, so the store is the only channel there is: these poll it,
with the harness's hang guard as their only deadline (never a timing assertion).
"""

from __future__ import annotations

from collections.abc import Callable

from opspawn_mcp.models import Task, TaskEvent
from opspawn_mcp.store.base import TaskStore
from tests.servers.harness import wait_until_async


def states(events: list[TaskEvent]) -> list[str]:
    """The statuses a task's event log recorded, in order."""
    return [e.data["status"] for e in events if e.kind == "state"]


async def until(store: TaskStore, task_id: str, predicate: Callable[[Task], bool]) -> Task:
    """Poll the stored task until ``predicate`` holds; the task as it was then."""
    seen: list[Task] = []

    async def holds() -> bool:
        seen.append(await store.get(task_id))
        return predicate(seen[-1])

    await wait_until_async(holds)
    return seen[-1]


async def until_finished(store: TaskStore, task_id: str) -> Task:
    """Poll until the task is in a terminal state; the finished task."""
    return await until(store, task_id, lambda task: task.status.terminal)


async def until_a_tool_is_called(store: TaskStore, task_id: str) -> None:
    """Poll the task's event log until its agent has called a tool (it is mid-task)."""

    async def called() -> bool:
        return any(e.kind == "tool_call" for e in await store.events(task_id))

    await wait_until_async(called)
