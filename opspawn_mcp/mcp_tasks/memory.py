"""A ``TaskBackend`` that runs coroutines in this process and keeps their tasks in memory.

For servers whose tasks need not outlive the process (the conformance fixture, client tests).
See docs/mcp-server.md, "Two protocol eras, and MCP Tasks".
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, CallToolRequestParams, CallToolResult, Result

from opspawn_mcp.mcp_tasks.backend import RequestContext, TaskSupport, UnknownTask
from opspawn_mcp.mcp_tasks.wire import DetailedTask, Task, TaskStatusName

DEFAULT_TTL_MS = 3_600_000
DEFAULT_POLL_INTERVAL_MS = 200


class TaskInput:
    """A running job's channel to the client: ``ask`` parks the task until it is answered."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry

    async def ask(self, requests: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """Publish ``requests`` (key -> an input request such as ``elicitation/create``) and
        return the client's responses by key once all of them arrived."""
        loop = asyncio.get_running_loop()
        waiting = {key: loop.create_future() for key in requests}
        self._entry.pending.update({key: (request, waiting[key]) for key, request in requests.items()})
        self._entry.touch("input_required")
        return dict(zip(waiting, await asyncio.gather(*waiting.values()), strict=True))


Job = Callable[[CallToolRequestParams, TaskInput], Awaitable[CallToolResult]]


@dataclass
class _Entry:
    meta: Task
    """What every answer about the task carries, its status and last update kept current."""
    result: CallToolResult | None = None
    error: dict[str, Any] | None = None
    pending: dict[str, tuple[dict[str, Any], asyncio.Future[Any]]] = field(default_factory=dict)
    runner: asyncio.Task[None] | None = None

    @property
    def status(self) -> TaskStatusName:
        return self.meta.status

    def touch(self, status: TaskStatusName) -> None:
        self.meta = self.meta.model_copy(update={"status": status, "last_updated_at": datetime.now(UTC)})

    @property
    def expired(self) -> bool:
        ttl_ms = self.meta.ttl_ms
        kept_until = None if ttl_ms is None else self.meta.created_at + timedelta(milliseconds=ttl_ms)
        return kept_until is not None and datetime.now(UTC) > kept_until


class MemoryTaskBackend:
    """Tasks of ``jobs`` (tool name -> its task support and the coroutine that does the work)."""

    def __init__(
        self,
        jobs: Mapping[str, tuple[TaskSupport, Job]],
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS,
    ) -> None:
        self._jobs = dict(jobs)
        self._ttl_ms = ttl_ms
        self._poll_ms = poll_interval_ms
        self._tasks: dict[str, _Entry] = {}
        self._group: asyncio.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for entry in self._tasks.values():
            if entry.runner is not None:
                entry.runner.cancel()
        group, self._group = self._group, None
        assert group is not None
        await group.__aexit__(kind, exc, tb)

    def support(self, tool: str) -> TaskSupport | None:
        job = self._jobs.get(tool)
        return None if job is None else job[0]

    async def create(self, params: CallToolRequestParams, ctx: RequestContext) -> DetailedTask | Result:
        if self._group is None:
            raise RuntimeError("enter the MemoryTaskBackend (async with) before serving its tasks")
        self._tasks = {k: e for k, e in self._tasks.items() if not e.expired}
        now = datetime.now(UTC)
        entry = _Entry(
            Task(
                task_id=str(uuid.uuid4()),
                status="working",
                created_at=now,
                last_updated_at=now,
                ttl_ms=self._ttl_ms,
                poll_interval_ms=self._poll_ms,
            )
        )
        self._tasks[entry.meta.task_id] = entry
        entry.runner = self._group.create_task(self._run(entry, self._jobs[params.name][1], params))
        return self._view(entry)

    async def _run(self, entry: _Entry, job: Job, params: CallToolRequestParams) -> None:
        try:
            result = await job(params, TaskInput(entry))
        except asyncio.CancelledError:
            entry.touch("cancelled")
            return
        except MCPError as exc:
            entry.error = exc.error.model_dump(mode="json", exclude_none=True)
            entry.touch("failed")
            return
        except Exception as exc:  # the job's failure is the task's, not the server's
            entry.error = {"code": INTERNAL_ERROR, "message": f"{type(exc).__name__}: {exc}"}
            entry.touch("failed")
            return
        entry.result = result
        entry.touch("completed")

    def _entry(self, task_id: str) -> _Entry:
        entry = self._tasks.get(task_id)
        if entry is None or entry.expired:
            raise UnknownTask(task_id)
        return entry

    def _view(self, entry: _Entry) -> DetailedTask:
        pending = {key: request for key, (request, _) in entry.pending.items()}
        return DetailedTask(
            **dict(entry.meta),
            result=None
            if entry.result is None
            else entry.result.model_dump(by_alias=True, mode="json", exclude_none=True),
            error=entry.error,
            input_requests=pending if entry.status == "input_required" else None,
        )

    async def get(self, task_id: str, ctx: RequestContext) -> DetailedTask:
        return self._view(self._entry(task_id))

    async def update(self, task_id: str, responses: dict[str, Any], ctx: RequestContext) -> None:
        entry = self._entry(task_id)
        for key in responses.keys() & entry.pending.keys():
            _, waiting = entry.pending.pop(key)
            waiting.set_result(responses[key])
        if entry.status == "input_required" and not entry.pending:
            entry.touch("working")

    async def cancel(self, task_id: str, ctx: RequestContext) -> None:
        entry = self._entry(task_id)
        if entry.status in ("working", "input_required") and entry.runner is not None:
            entry.runner.cancel()
            await asyncio.wait({entry.runner})
