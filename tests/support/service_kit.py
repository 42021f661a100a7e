"""The parts a real ``TaskService`` needs in the unit tests, shared by every door's tests.

The fixtures over these (``store``, ``enqueuer``, ``service``) are in ``tests/unit/conftest.py``;
the classes and builders live here because some tests (the schemathesis one) build their app
at import time, outside any fixture.
"""

from __future__ import annotations

import asyncio
from typing import Any

import agentkit
from opspawn_mcp.approvals import approval_request
from opspawn_mcp.config import Config, parse_config
from opspawn_mcp.host.models import ServerInfo
from opspawn_mcp.models import Task, TaskEvent, TaskStatus
from opspawn_mcp.scheduler import Enqueuer
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore


class RecordingEnqueuer:
    """A real enqueuer that keeps the ids it was given, in order; no worker runs.

    ``enqueued`` is set on the first id, for a test that plays the worker.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.enqueued = asyncio.Event()

    async def enqueue(self, task_id: str) -> None:
        self.ids.append(task_id)
        self.enqueued.set()

    async def ping(self) -> None:
        """Its broker is always reachable."""


class Directory:
    """The pool's snapshot, as a fixed list: one entry per server ``make_config`` defines."""

    def servers_info(self) -> list[ServerInfo]:
        return [
            ServerInfo(name="echo", transport="stdio", state="ready", tools=["echo"], tool_count=1),
            ServerInfo(
                name="files", transport="streamable-http", state="ready", tools=["read"], tool_count=1
            ),
        ]


def make_config(environ: dict[str, str] | None = None, **llm: Any) -> Config:
    """Two downstream servers, ``echo`` (stdio) and ``files`` (HTTP), and a memory store.

    ``llm`` replaces ``opspawn.llm`` (the local provider by default); ``environ`` is what the
    config's ``${VAR}`` references are resolved against.
    """
    return parse_config(
        {
            "mcpServers": {
                "echo": {"command": "python", "args": ["-m", "x"]},
                "files": {"url": "http://127.0.0.1:1/mcp"},
            },
            "opspawn": {"store_url": "memory://", "llm": llm or {"provider": "local"}},
        },
        environ=environ or {},
    )


def make_service(
    store: MemoryStore,
    enqueuer: Enqueuer | None = None,
    *,
    config: Config | None = None,
) -> TaskService:
    """A ``TaskService`` over ``store`` and the fixed ``Directory``; watchers poll every 10 ms."""
    return TaskService(
        config or make_config(),
        store,
        enqueuer if enqueuer is not None else RecordingEnqueuer(),
        Directory(),
        poll_interval_s=0.01,
    )


class CountingStore(MemoryStore):
    """A real memory store that counts the log reads its watchers make."""

    def __init__(self) -> None:
        super().__init__()
        self.event_reads = 0

    async def events(self, task_id: str, after_seq: int = 0, limit: int = 1000) -> list[TaskEvent]:
        self.event_reads += 1
        return await super().events(task_id, after_seq, limit)


class BrokenStore(MemoryStore):
    """A store with a bug (not a typed error): a door must not leak its text or trace."""

    async def get(self, task_id: str) -> Task:
        raise RuntimeError("secret internal detail")


WARNING = "the agent finished without a successful tool result (last tool error: t__fail: disk full)"
"""What the worker writes on a task whose every tool call failed (``opspawn_mcp.outcome``)."""


async def finish(store: MemoryStore, task_id: str, result: str, *, warning: str | None = None) -> None:
    """Do what a worker does, through the real store: claim, log, complete (with ``warning``)."""
    await store.claim(task_id, "w1", 30.0, 3)
    await store.append_event(task_id, "state", {"status": "running"})
    await store.append_event(task_id, "final", {"result": result})
    await store.transition(
        task_id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result=result, owner="w1", warning=warning
    )


async def pause(store: MemoryStore, task_id: str, *, timeout_s: float = 3600.0) -> Task:
    """Do what a worker does when its agent reaches a call needing approval: claim the task and
    pause it on a request to run ``files__delete`` (tool call 1 of step 1)."""
    claimed = await store.claim(task_id, "w1", 30.0, 3)
    assert claimed is not None
    call = agentkit.ToolCall(id="c1", name="files__delete", arguments={"path": "/tmp/x"})
    request = approval_request(claimed, agentkit.PendingApproval(ordinal=1, step=1, call=call), timeout_s)
    return await store.transition(
        task_id,
        {TaskStatus.RUNNING},
        TaskStatus.INPUT_REQUIRED,
        owner="w1",
        approval=request,
        event=("input_required", request.model_dump(mode="json")),
    )
