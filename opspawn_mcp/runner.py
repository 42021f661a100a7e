"""The actor body: ``TaskRunner.execute(task_id)`` runs one task, whoever delivered its id.

It is idempotent, because delivery is at least once: it *claims* the task in the store
(``queued -> running`` with a lease, or a running task whose lease expired), and does nothing if
the claim is refused (finished, cancelled, or held by a live worker). While the agent runs, a
heartbeat renews the lease; each agent step is written as a task event. The run ends with
``completed`` + result or ``failed`` + a reason a human can act on, both as a compare-and-set
guarded by the lease owner, so a worker that lost its lease (or a task cancelled meanwhile) can
never overwrite the truth. Nothing escapes as an exception: a tool error is an observation for
the model (agentkit), an LLM failure or a bug is a ``failed`` task with its reason.

**Cancellation** is a store transition made by ``TaskService.cancel``. A queued task then never
starts (``claim`` refuses it). A running one learns it on its next agent event or heartbeat
(``renew`` refuses a task that is no longer running), whichever comes first, and calls
``agent.cancel()``: it stops within one step, and the in-flight tool call is cancelled.

The runner lives on one event loop with its store and pool (asyncio objects are loop-bound);
``embedded.EmbeddedWorker`` and ``worker.run_worker_process`` are its two hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from opspawn_mcp.agent_factory import AgentSetupError, build_agent, close_llm
from opspawn_mcp.config import Config
from opspawn_mcp.errors import Conflict, IllegalTransition, OpspawnError, TaskNotFound, Unavailable
from opspawn_mcp.models import Task, TaskStatus, Usage, utcnow
from opspawn_mcp.recovery import give_up
from opspawn_mcp.store._common import EVENT_KINDS
from opspawn_mcp.store.base import TaskStore

log = logging.getLogger(__name__)

Enqueue = Callable[[str], Awaitable[None]]

# How long a cancelled agent may take to notice agent.cancel() before its asyncio task is
# cancelled outright (a tool that ignores cancellation must not pin a worker slot forever).
CANCEL_GRACE_S = 10.0
# Event payload strings are capped: a tool returning megabytes must not bloat the event log.
MAX_EVENT_TEXT = 8_000
SHUTDOWN_REASON = "worker shutting down"
STORE_RETRY_S = 2.0


def new_owner_id() -> str:
    """Unique per runner: host and pid for humans reading ``lease_owner``, a suffix for uniqueness.
    Each claim appends its own suffix (``host:pid:runner/claim``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _jsonable(value: Any) -> Any:
    """JSON values only, long strings cut: events are stored and streamed as they are."""
    if isinstance(value, str):
        return value if len(value) <= MAX_EVENT_TEXT else value[:MAX_EVENT_TEXT] + "... [truncated]"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _jsonable(json.loads(json.dumps(value, default=str)))


def _usage_of(value: Any) -> Usage:
    if value is None:
        return Usage()
    data = value.model_dump() if hasattr(value, "model_dump") else value
    if not isinstance(data, dict):
        return Usage()
    return Usage(
        input_tokens=int(data.get("input_tokens") or 0), output_tokens=int(data.get("output_tokens") or 0)
    )


class _Execution:
    """One running task in this runner: its agent and why (if at all) we asked it to stop."""

    def __init__(self, task: Task, owner: str) -> None:
        self.task = task
        self.owner = owner
        self.agent: Any = None
        self.run_task: asyncio.Task[Any] | None = None
        self.stop_reason: str | None = None  # "cancelled" | "lost" | "shutdown"
        self.steps = 0
        self.usage = Usage()

    def stop(self, reason: str) -> None:
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        if self.agent is not None:
            self.agent.cancel()
        run_task = self.run_task
        if run_task is not None:
            # Backstop only: agent.cancel() normally ends the run within one step.
            loop = asyncio.get_running_loop()
            loop.call_later(CANCEL_GRACE_S, lambda: run_task.done() or run_task.cancel())


class TaskRunner:
    """The actor body and what it needs: config, store, pool, a way to re-enqueue, a lease owner.

    Lives on one event loop with its store and pool. ``execute`` may run many times concurrently.
    """

    def __init__(
        self,
        config: Config,
        store: TaskStore,
        pool: Any,
        enqueue: Enqueue,
        *,
        owner: str | None = None,
        requeue_on_shutdown: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.owner = owner or new_owner_id()
        self._enqueue = enqueue
        self._requeue_on_shutdown = requeue_on_shutdown
        self._running: dict[str, _Execution] = {}
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def _ttl(self) -> float:
        return self.config.opspawn.worker.lease_ttl_s

    @property
    def _max_attempts(self) -> int:
        return self.config.opspawn.worker.max_attempts

    @property
    def running(self) -> list[str]:
        """Ids of the tasks this runner is executing now."""
        return [e.task.id for e in self._running.values()]

    def begin_shutdown(self) -> None:
        """Refuse new work and stop every running agent; each hands its task back as ``queued``."""
        self._closing = True
        for execution in list(self._running.values()):
            execution.stop("shutdown")

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- the actor body ---------------------------------------------------------------------

    async def execute(self, task_id: str) -> None:
        """Run the task once, or do nothing if it is not ours to run.

        Never raises for anything the task does. If the store is down at claim time the id is
        re-enqueued after a pause; only a failure of that re-enqueue propagates (the broker then
        dead-letters the message, and the task, still ``queued`` in the store, is re-enqueued by
        the next worker start)."""
        if self._closing:
            # Hand the message back untouched rather than starting work we would abandon.
            if self._requeue_on_shutdown:
                await self._enqueue(task_id)
            return
        # One lease owner per claim, not per runner: if this runner re-claims a task whose lease
        # it let expire, the stale execution must lose its owner guard too.
        owner = f"{self.owner}/{uuid.uuid4().hex[:6]}"
        try:
            task = await self.store.claim(task_id, owner, self._ttl, self._max_attempts)
            if task is None:
                await self._refused(task_id)
                return
        except TaskNotFound:
            log.warning("message for unknown task %s dropped", task_id)
            return
        except Unavailable as exc:
            # The store is down: keep the message alive instead of letting the broker
            # dead-letter it. The pause keeps a long outage from becoming a hot loop.
            log.warning(
                "task %s: store unavailable (%s); re-enqueueing in %.1fs", task_id, exc, STORE_RETRY_S
            )
            await asyncio.sleep(STORE_RETRY_S)
            await self._enqueue(task_id)
            return
        execution = _Execution(task, owner)
        self._running[owner] = execution
        self._idle.clear()
        # The lease is renewed from the moment of the claim: building the agent may start
        # downstream servers, which can take longer than a short lease.
        heartbeat = asyncio.create_task(self._heartbeat(execution))
        try:
            await self._run(execution)
        except Exception as exc:
            log.exception("task %s: unexpected error in the worker", task_id)
            try:
                await self._finish(
                    execution,
                    TaskStatus.FAILED,
                    error=f"internal error in the opspawn worker ({type(exc).__name__}: {exc}); "
                    "please report it with the task id",
                )
            except Exception:
                # Most likely the store itself is down. The lease will lapse and the recovery
                # loop runs the task again, so nothing is lost by giving up here.
                log.exception("task %s: could not record the failure; recovery will retry it", task_id)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            del self._running[owner]
            if not self._running:
                self._idle.set()

    async def _refused(self, task_id: str) -> None:
        """The claim said no. Either it is not ours (no-op), or it is out of attempts (fail it)."""
        task = await self.store.get(task_id)
        if task.status.terminal:
            log.debug("task %s already %s; redelivered message ignored", task_id, task.status.value)
            return
        lease_live = task.lease_expires_at is not None and task.lease_expires_at >= utcnow()
        if task.status is TaskStatus.RUNNING and lease_live:
            log.debug("task %s is running on %s; duplicate message ignored", task_id, task.lease_owner)
            return
        if task.attempts >= self._max_attempts:
            await give_up(self.store, task_id, task.attempts, task.error, task.lease_owner)

    async def _run(self, execution: _Execution) -> None:
        task = execution.task
        await self.store.append_event(
            task.id, "state", {"status": "running", "attempt": task.attempts, "worker": execution.owner}
        )

        async def on_event(event: Any) -> None:
            await self._on_agent_event(execution, event)

        try:
            agent, llm = await build_agent(task.spec, self.config, self.pool, on_event)
        except AgentSetupError as exc:
            await self._finish(execution, TaskStatus.FAILED, error=str(exc))
            return
        execution.agent = agent
        try:
            execution.run_task = asyncio.create_task(agent.run(task.spec.goal))
            if execution.stop_reason is not None:
                agent.cancel()
            try:
                result: Any = await execution.run_task
            except asyncio.CancelledError:
                if execution.stop_reason is None:
                    raise  # we ourselves are being cancelled
                result = None
        finally:
            await close_llm(llm)
        await self._conclude(execution, result)

    async def _conclude(self, execution: _Execution, result: Any) -> None:
        task = execution.task
        if result is not None:
            execution.usage = _usage_of(getattr(result, "usage", None))
            execution.steps = len(getattr(result, "steps", []) or []) or execution.steps
        reason = execution.stop_reason
        if reason == "shutdown":
            await self._hand_back(execution)
            return
        if reason in ("cancelled", "lost"):
            # Someone else decided the task's fate (a cancel, or another worker that took over
            # an expired lease): write nothing more to it.
            log.info("task %s: agent stopped (%s)", task.id, reason)
            return
        status = str(getattr(result, "status", "failed"))
        if status == "completed":
            await self._finish(execution, TaskStatus.COMPLETED, result=result.output or "")
        elif status == "timed_out":
            await self._finish(
                execution,
                TaskStatus.FAILED,
                error=f"the agent did not finish within timeout_s={task.spec.timeout_s:g}s; "
                "raise timeout_s or split the goal into smaller tasks",
            )
        elif status == "cancelled":
            await self._finish(
                execution, TaskStatus.FAILED, error="the agent stopped without an answer (cancelled)"
            )
        else:
            error = getattr(result, "error", None) or "the agent failed without saying why"
            await self._finish(execution, TaskStatus.FAILED, error=f"the agent failed: {error}")

    async def _finish(
        self,
        execution: _Execution,
        status: TaskStatus,
        *,
        result: str | None = None,
        error: str | None = None,
    ) -> None:
        """The owner-guarded final transition; losing the race (cancel, lost lease) is fine."""
        task_id = execution.task.id
        with contextlib.suppress(OpspawnError):
            await self.store.record_progress(task_id, execution.steps, execution.usage)
        try:
            await self.store.transition(
                task_id,
                {TaskStatus.RUNNING},
                status,
                result=result,
                error=error,
                usage=execution.usage,
                owner=execution.owner,
            )
        except IllegalTransition:
            log.info("task %s: not %s, it changed meanwhile (cancelled or taken over)", task_id, status)
            return
        log.info("task %s %s%s", task_id, status.value, f": {error}" if error else "")

    async def _hand_back(self, execution: _Execution) -> None:
        """Shutdown: return the task to ``queued`` (attempt already counted) for another worker."""
        task_id = execution.task.id
        try:
            await self.store.transition(
                task_id,
                {TaskStatus.RUNNING},
                TaskStatus.QUEUED,
                owner=execution.owner,
                reason=SHUTDOWN_REASON,
            )
        except IllegalTransition:
            return
        if self._requeue_on_shutdown:
            try:
                await self._enqueue(task_id)
            except Exception as exc:
                log.warning("task %s handed back but not re-enqueued (%s); recovery will", task_id, exc)

    async def _on_agent_event(self, execution: _Execution, event: Any) -> None:
        """Write the step to the event log, record progress, and notice a cancel or lost lease."""
        if execution.stop_reason is not None:
            return
        task_id = execution.task.id
        kind = str(getattr(event, "kind", "log"))
        step = int(getattr(event, "step", 0) or 0)
        raw = getattr(event, "data", {}) or {}
        data: dict[str, Any] = {"step": step, **_jsonable(dict(raw))}
        if kind not in EVENT_KINDS or kind == "state":
            data["agent_event"] = kind
            kind = "log"
        if "usage" in raw:
            # "llm" events carry one call's usage; "final"/"error" carry the run's total.
            usage = _usage_of(raw["usage"])
            if kind == "llm":
                usage = Usage(
                    input_tokens=execution.usage.input_tokens + usage.input_tokens,
                    output_tokens=execution.usage.output_tokens + usage.output_tokens,
                )
            execution.usage = usage
        execution.steps = max(execution.steps, step)
        try:
            current = await self.store.get(task_id)
            if current.status is not TaskStatus.RUNNING or current.lease_owner != execution.owner:
                execution.stop("cancelled" if current.status is TaskStatus.CANCELLED else "lost")
                return
            await self.store.append_event(task_id, kind, data)
            await self.store.record_progress(task_id, execution.steps, execution.usage)
        except Conflict:
            # The task was cancelled between the check above and the append; the store has
            # closed its log, so the agent stops here.
            execution.stop("cancelled")
        except OpspawnError as exc:
            # The store hiccuped: the agent keeps going; the heartbeat decides if we lost the task.
            log.warning("task %s: could not record an event: %s", task_id, exc)

    async def _heartbeat(self, execution: _Execution) -> None:
        """Renew the lease every third of its TTL (at most every second, so a cancel is seen
        quickly even while a long tool call runs); a refused renewal stops the agent."""
        task_id = execution.task.id
        interval = min(self._ttl / 3, 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.store.renew(task_id, execution.owner, self._ttl):
                    continue
                current = await self.store.get(task_id)
            except Exception as exc:
                # Keep trying: while the store is unreachable nobody else can take the task
                # over either, and the owner-guarded final transition settles any doubt.
                log.warning("task %s: lease renewal failed, retrying: %s", task_id, exc)
                continue
            execution.stop("cancelled" if current.status is TaskStatus.CANCELLED else "lost")
            return
