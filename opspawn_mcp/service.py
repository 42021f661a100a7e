"""TaskService: the one API behind every front door (MCP tools, REST routes, gRPC methods).

Every rule about what a client may ask lives here once: which servers a task may use, how a
spec is validated and its model settings resolved, what cancel means in each state, how a
watcher follows a task. The doors only translate their wire format to these calls and the
typed ``OpspawnError``s back, so behaviour and messages are identical at every door.
"""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import ValidationError

from opspawn_mcp.config import Config
from opspawn_mcp.errors import (
    Conflict,
    Forbidden,
    IllegalTransition,
    InvalidInput,
    OpspawnError,
    PayloadTooLarge,
    TaskNotFound,
    Unavailable,
)
from opspawn_mcp.host.models import ServerInfo
from opspawn_mcp.models import GOAL_MAX_CHARS, ModelSettings, Task, TaskEvent, TaskPage, TaskSpec, TaskStatus
from opspawn_mcp.scheduler import Enqueuer, Scheduler
from opspawn_mcp.store.base import TaskStore

TASK_ID_MAX_CHARS = 64
EVENTS_PAGE_MAX = 1000
LIST_PAGE_MAX = 200
WAIT_MAX_S = 600.0
CANCELLED_BY_CLIENT = "cancelled by the client"


class ServerDirectory(Protocol):
    """What the service needs from the host pool (``OpsMcpClient``): a snapshot, no I/O."""

    def servers_info(self) -> Sequence[ServerInfo]: ...


EventCallback = Callable[[TaskEvent], Awaitable[None]]


class TaskService:
    """Validates requests, schedules tasks, and reads them back; owns none of its parts.

    ``config`` says which downstream servers exist and the LLM defaults; ``store`` is the
    truth; ``enqueuer`` hands ids to the workers; ``servers`` describes the downstream pool.
    ``poll_interval_s`` bounds how stale a watcher can be: the worker may be another process,
    so the event log in the store is the only channel there is.
    """

    def __init__(
        self,
        config: Config,
        store: TaskStore,
        enqueuer: Enqueuer,
        servers: ServerDirectory,
        *,
        poll_interval_s: float = 0.1,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._enqueuer = enqueuer
        self._scheduler = Scheduler(store, enqueuer)
        self._servers = servers
        self._poll_s = poll_interval_s
        self._environ = environ

    # -- validation -----------------------------------------------------------------------

    def validate(self, spec: TaskSpec | Mapping[str, Any]) -> TaskSpec:
        """Turn a client's request into a spec that can run, or raise a typed error saying why not.

        Returns a copy whose model settings are fully resolved against ``opspawn.llm``, so the
        worker runs exactly what was accepted even if the defaults change later.
        """
        if isinstance(spec, TaskSpec):
            raw: Any = spec.model_dump(exclude_unset=True)
        elif isinstance(spec, Mapping):
            raw = dict(spec)
        else:
            raise InvalidInput(f"A task spec must be a JSON object, not {type(spec).__name__}.")
        goal = raw.get("goal")
        if isinstance(goal, str) and len(goal) > GOAL_MAX_CHARS:
            raise PayloadTooLarge(
                f"The goal is {len(goal)} characters; the limit is {GOAL_MAX_CHARS}. "
                "Shorten it or move bulky material into a downstream server the agent can read.",
                field="goal",
            )
        try:
            checked = TaskSpec.model_validate(raw)
        except ValidationError as exc:
            raise InvalidInput(_describe(exc), problems=_problems(exc)) from None
        if not checked.goal.strip():
            raise InvalidInput("The goal is blank; say what the agent must do.", field="goal")
        servers = self._check_servers(checked.servers)
        return checked.model_copy(update={"servers": servers, "model": self._resolve_model(checked.model)})

    def _check_servers(self, wanted: list[str] | None) -> list[str] | None:
        """Only servers the config defines may be used: the caller cannot add its own."""
        if wanted is None:
            return None
        configured = self._config.mcp_servers
        unknown = [name for name in wanted if name not in configured]
        if unknown:
            known = ", ".join(sorted(configured)) or "none are configured"
            raise Forbidden(
                f"Unknown server(s) {', '.join(map(repr, unknown))}; this opspawn allows only: {known}. "
                "Call list_servers to see them.",
                servers=unknown,
            )
        return list(dict.fromkeys(wanted))

    def _resolve_model(self, given: ModelSettings) -> ModelSettings:
        """Fill unset model settings from the config and refuse what no worker could run.

        A server-side API key is only ever sent to the endpoint the config names: a client
        that picks its own ``base_url`` gets no key, and may not name one, or it could
        point the worker at its own host and read the key off the request.
        """
        llm = self._config.opspawn.llm
        provider = given.provider or llm.provider
        same_provider = provider == llm.provider
        foreign_url = given.base_url is not None and not (same_provider and given.base_url == llm.base_url)
        if foreign_url and given.api_key_env:
            raise Forbidden(
                "model.api_key_env cannot be combined with a model.base_url the config does not name: "
                "keys are only sent to the configured endpoint. Drop one of them.",
                field="model.api_key_env",
            )
        default_key = llm.api_key_env if same_provider and not foreign_url else None
        resolved = given.model_copy(
            update={
                "provider": provider,
                "base_url": given.base_url or (llm.base_url if same_provider else None),
                "model": given.model or (llm.model if same_provider else None),
                "api_key_env": given.api_key_env or default_key,
            }
        )
        if provider == "openai" and not resolved.model:
            raise InvalidInput(
                "No model name for the 'openai' provider: pass model.model or set opspawn.llm.model.",
                field="model.model",
            )
        key = resolved.api_key_env
        if key and self._config.opspawn.broker_url == "embedded":
            env = os.environ if self._environ is None else self._environ
            if key not in env:
                # The embedded worker shares this process's environment, so we can tell now
                # instead of letting the task fail later.
                raise InvalidInput(
                    f"model.api_key_env names {key}, which is not set for this server.",
                    field="model.api_key_env",
                )
        return resolved

    # -- commands ---------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec | Mapping[str, Any]) -> Task:
        """Validate, persist as ``queued``, enqueue; the returned task is durable and will run."""
        return await self._scheduler.schedule(self.validate(spec))

    async def get(self, task_id: str) -> Task:
        return await self._store.get(_check_id(task_id))

    async def list(
        self, status: TaskStatus | str | None = None, limit: int = 50, cursor: str | None = None
    ) -> TaskPage:
        """Newest first. ``cursor`` is the ``next_cursor`` of the previous page."""
        wanted = _status(status)
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidInput("cursor must be the next_cursor string of a previous page.", field="cursor")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_PAGE_MAX:
            raise InvalidInput(f"limit must be an integer from 1 to {LIST_PAGE_MAX}.", field="limit")
        return await self._store.list(wanted, limit, cursor or None)

    async def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task; cancelling a cancelled task is a no-op.

        A running task is cancelled in the store only: its worker's own final transition then
        fails the compare-and-set, which is how it learns to stop (within one step). A task
        that already completed or failed cannot be cancelled: that is a ``Conflict``.
        """
        current = await self.get(task_id)
        if current.status is TaskStatus.CANCELLED:
            return current
        try:
            task = await self._store.transition(
                current.id,
                {TaskStatus.QUEUED, TaskStatus.RUNNING},
                TaskStatus.CANCELLED,
                error=CANCELLED_BY_CLIENT,
            )
        except IllegalTransition:
            # Lost a race with the worker: report the state it really reached.
            latest = await self._store.get(current.id)
            if latest.status is TaskStatus.CANCELLED:
                return latest
            raise Conflict(
                f"Task {latest.id} already {latest.status.value}; only queued or running tasks can be cancelled.",
                task_id=latest.id,
                status=latest.status.value,
            ) from None
        return task

    # -- events ---------------------------------------------------------------------------

    async def events(self, task_id: str, after_seq: int = 0, limit: int = 100) -> builtins.list[TaskEvent]:
        """One page of the task's event log, oldest first, after ``after_seq``."""
        task = await self.get(task_id)
        _check_seq(after_seq)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= EVENTS_PAGE_MAX:
            raise InvalidInput(f"limit must be an integer from 1 to {EVENTS_PAGE_MAX}.", field="limit")
        return await self._store.events(task.id, after_seq, limit)

    async def watch(self, task_id: str, after_seq: int = 0) -> AsyncGenerator[TaskEvent, None]:
        """Yield the task's events as they are written, ending once the task is terminal.

        The status is read *before* each batch: if it was already terminal, that batch holds
        every event written before the final transition, so nothing the worker wrote ahead of
        finishing is missed. An unknown id raises on the first iteration.
        """
        task = await self.get(task_id)
        _check_seq(after_seq)
        seq = after_seq
        while True:
            finished = (await self._store.get(task.id)).status.terminal
            batch = await self._store.events(task.id, seq, EVENTS_PAGE_MAX)
            for event in batch:
                seq = event.seq
                yield event
            if len(batch) == EVENTS_PAGE_MAX:
                continue
            if finished:
                return
            await asyncio.sleep(self._poll_s)

    def check_wait(self, timeout_s: float) -> None:
        """A wait is 0 to ``WAIT_MAX_S`` seconds: longer ones outlive most clients' request timeouts."""
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 <= timeout_s <= WAIT_MAX_S
        ):
            raise InvalidInput(f"wait must be a number of seconds from 0 to {WAIT_MAX_S:g}.", field="wait")

    async def wait(self, task_id: str, timeout_s: float, on_event: EventCallback | None = None) -> Task:
        """Follow the task for up to ``timeout_s`` seconds, calling ``on_event`` for each new event;
        return the task as it is then (terminal, or still queued/running if time ran out).

        Every door that offers "submit and wait" uses this, so they all time out the same way.
        """
        self.check_wait(timeout_s)
        task = await self.get(task_id)
        if timeout_s == 0 or task.status.terminal:
            return task
        stream = self.watch(task.id)
        try:
            async with asyncio.timeout(timeout_s):
                async for event in stream:
                    if on_event is not None:
                        await on_event(event)
        except TimeoutError:
            pass
        finally:
            await stream.aclose()
        return await self.get(task.id)

    # -- health ---------------------------------------------------------------------------

    def list_servers(self) -> builtins.list[ServerInfo]:
        """The configured downstream servers with state and tools, straight from the pool."""
        return list(self._servers.servers_info())

    async def ready(self) -> None:
        """Raise ``Unavailable`` when the service cannot run tasks: the store or the broker is down."""
        try:
            await self._store.ping()
        except OpspawnError:
            raise
        except Exception as exc:
            raise Unavailable(f"The task store cannot be reached: {exc}") from exc
        await self._enqueuer.ping()


def _check_id(task_id: str) -> str:
    if not isinstance(task_id, str):
        raise InvalidInput("task_id must be a string: the id submit_task returned.", field="task_id")
    if not task_id.strip():
        raise InvalidInput("task_id is empty; pass the id submit_task returned.", field="task_id")
    if len(task_id) > TASK_ID_MAX_CHARS:
        raise TaskNotFound(task_id[:TASK_ID_MAX_CHARS] + "...")
    return task_id.strip()


def _check_seq(after_seq: int) -> None:
    if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
        raise InvalidInput("after_seq must be an integer >= 0.", field="after_seq")


def _status(status: TaskStatus | str | None) -> TaskStatus | None:
    if status is None or status == "":
        return None
    try:
        return TaskStatus(status)
    except ValueError:
        names = ", ".join(s.value for s in TaskStatus)
        raise InvalidInput(f"Unknown status {status!r}; use one of {names}.", field="status") from None


def _problems(exc: ValidationError) -> builtins.list[str]:
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(spec)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{where}: {msg}")
    return out


def _describe(exc: ValidationError) -> str:
    return "Invalid task spec: " + "; ".join(_problems(exc)) + "."
