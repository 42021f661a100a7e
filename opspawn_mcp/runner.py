"""The actor body: ``TaskRunner.execute(task_id)`` runs one task, whoever delivered its id.

Claim, heartbeat, journal, and an owner-guarded conclusion, so a duplicate delivery is harmless.
See docs/workers.md, "What the actor does".
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
from typing import Any, Unpack

import agentkit
from opspawn_mcp.agent_factory import AgentSetupError, LlmClients, ToolPool, build_agent
from opspawn_mcp.approvals import approval_request
from opspawn_mcp.config import Config
from opspawn_mcp.errors import Conflict, IllegalTransition, OpspawnError, TaskNotFound, Unavailable
from opspawn_mcp.models import ApprovalRequest, Task, TaskEvent, TaskStatus, Usage, utcnow
from opspawn_mcp.outcome import completion_warning
from opspawn_mcp.recovery import give_up
from opspawn_mcp.scheduler import publish
from opspawn_mcp.store._common import EVENT_KINDS
from opspawn_mcp.store.base import JournalRow, Outcome, TaskStore
from opspawn_mcp.telemetry.hooks import runs_task, task_finished
from opspawn_mcp.telemetry.logs import announce

log = logging.getLogger(__name__)

INTERNAL_ERROR_REASON = "internal error in the opspawn worker"
"""How a task's error begins when opspawn itself, not the agent, broke (MCP Tasks: ``failed``)."""

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


class _StoreJournal:
    """agentkit's ``Journal`` over the task's stored entries.

    ``load`` hands the agent what earlier attempts finished. A new entry is held until the next
    event of the run and written with it in one transaction (``TaskStore.record``): agentkit
    appends an entry before the event that announces it and does not act on the fact before
    both returned, so the fact is durable before anything depends on it. Entries of model calls
    that have no event of their own (a planner's) go with the next event of any kind.
    """

    def __init__(self, rows: list[JournalRow], attempt: int) -> None:
        self._rows = rows
        self._attempt = attempt
        self._pending: list[JournalRow] = []

    async def load(self) -> list[agentkit.JournalEntry]:
        return [
            agentkit.JournalEntry(kind=r.kind, ordinal=r.ordinal, step=r.step, data=r.data)
            for r in self._rows
        ]

    async def append(self, entry: agentkit.JournalEntry) -> None:
        self._pending.append(
            JournalRow(
                kind=entry.kind,
                ordinal=entry.ordinal,
                step=entry.step,
                attempt=self._attempt,
                data=entry.data,
            )
        )

    def take(self) -> list[JournalRow]:
        taken, self._pending = self._pending, []
        return taken


class _Execution:
    """One running task in this runner: its agent, its journal and why (if at all) we asked it
    to stop. ``writing`` serialises its event writes, so an entry taken by one write is durable
    before a later event of the same run returns."""

    def __init__(self, task: Task, owner: str, journal: _StoreJournal) -> None:
        self.task = task
        self.owner = owner
        self.journal = journal
        self.agent: agentkit.Agent | None = None
        self.run_task: asyncio.Task[agentkit.RunResult] | None = None
        self.stop_reason: str | None = None  # "cancelled" | "lost" | "shutdown"
        self.steps = task.steps
        self.usage = task.usage
        self.writing = asyncio.Lock()

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

    Lives on one event loop with its store and pool; enter it (``async with``) to run the one
    heartbeat that renews every lease of this runner in one statement, and to share one model
    client per profile (``LlmClients``) between its tasks. ``execute`` may run many times
    concurrently.
    """

    def __init__(
        self,
        config: Config,
        store: TaskStore,
        pool: ToolPool,
        enqueue: Enqueue,
        *,
        owner: str | None = None,
        requeue_on_shutdown: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.owner = owner or new_owner_id()
        self.llms = LlmClients(config)
        self._enqueue = enqueue
        self._requeue_on_shutdown = requeue_on_shutdown
        self._running: dict[str, _Execution] = {}
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TaskRunner:
        self._heartbeat = asyncio.create_task(self._renew_forever(), name="opspawn-heartbeat")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        await self.llms.aclose()

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
        """Refuse new work and stop every running agent; each hands its task back as ``queued``.

        Says at once which tasks it hands back and how long it waits at most (a Ctrl-C that is
        quiet for seconds reads as a hang)."""
        self._closing = True
        stopping = [e for e in self._running.values() if e.stop_reason is None]
        if stopping:
            where = "to the queue" if self._requeue_on_shutdown else "for the next start"
            announce(
                f"opspawn: stopping {len(stopping)} running task(s) and handing them back {where}: "
                f"{', '.join(e.task.id for e in stopping)}; waiting at most {CANCEL_GRACE_S:g} s "
                "for their agents to stop"
            )
        for execution in stopping:
            execution.stop("shutdown")

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def resume(self, task_id: str) -> None:
        """Start ``execute`` in the background and return: how the recovery loop runs a task
        whose lease expired at once, instead of behind the queue's backlog."""
        task = asyncio.create_task(self.execute(task_id), name=f"opspawn-resume-{task_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the actor body ---------------------------------------------------------------------

    @runs_task
    async def execute(self, task_id: str) -> None:
        """Run the task once, or do nothing if it is not ours to run.

        Never raises for anything the task does. If the store is down at claim time the id is
        re-enqueued after a pause; only a failure of that re-enqueue propagates."""
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
            rows = await self.store.journal(task_id)
        except TaskNotFound:
            log.warning("message for unknown task %s dropped", task_id)
            return
        except Unavailable as exc:
            # The store is down: keep the message alive instead of letting the broker
            # dead-letter it. The pause keeps a long outage from becoming a hot loop. (A claim
            # that succeeded before the journal read failed lapses and is recovered.)
            log.warning(
                "task %s: store unavailable (%s); re-enqueueing in %.1fs", task_id, exc, STORE_RETRY_S
            )
            await asyncio.sleep(STORE_RETRY_S)
            await self._enqueue(task_id)
            return
        if rows:
            log.info("task %s: attempt %d resumes from %d journal entries", task_id, task.attempts, len(rows))
        execution = _Execution(task, owner, _StoreJournal(rows, task.attempts))
        self._running[owner] = execution
        self._idle.clear()
        try:
            await self._run(execution)
        except (Unavailable, agentkit.JournalError) as exc:
            # The store went away under the run: leave the task running; its lease lapses and
            # recovery resumes it from the journal, so nothing finished is lost or repeated.
            log.warning("task %s: stopped, the store is unavailable (%s); recovery resumes it", task_id, exc)
        except Exception as exc:
            log.exception("task %s: unexpected error in the worker", task_id)
            try:
                await self._finish(
                    execution,
                    TaskStatus.FAILED,
                    error=f"{INTERNAL_ERROR_REASON} ({type(exc).__name__}: {exc}); "
                    "please report it with the task id",
                )
            except Exception:
                # Most likely the store itself is down. The lease will lapse and the recovery
                # loop runs the task again, so nothing is lost by giving up here.
                log.exception("task %s: could not record the failure; recovery will retry it", task_id)
        finally:
            del self._running[owner]
            if not self._running:
                self._idle.set()

    async def _refused(self, task_id: str) -> None:
        """The claim said no. Either it is not ours (no-op), or it is out of attempts (fail it)."""
        task = await self.store.get(task_id)
        if task.status.terminal or task.status is TaskStatus.INPUT_REQUIRED:
            log.debug("task %s is %s; redelivered message ignored", task_id, task.status.value)
            return
        lease_live = task.lease_expires_at is not None and task.lease_expires_at >= utcnow()
        if task.status is TaskStatus.RUNNING and lease_live:
            log.debug("task %s is running on %s; duplicate message ignored", task_id, task.lease_owner)
            return
        if task.attempts >= self._max_attempts:
            await give_up(self.store, task_id, task.attempts, task.error, task.lease_owner)

    async def _run(self, execution: _Execution) -> None:
        task = execution.task
        started = {"status": "running", "attempt": task.attempts, "worker": execution.owner}
        if await self._write(execution, "state", started) is None:
            return

        async def on_event(event: agentkit.AgentEvent) -> None:
            await self._on_agent_event(execution, event)

        try:
            agent = await build_agent(task.spec, self.config, self.pool, on_event, self.llms)
        except AgentSetupError as exc:
            await self._finish(execution, TaskStatus.FAILED, error=str(exc))
            return
        execution.agent = agent
        run = agent.run(task.spec.goal, journal=execution.journal, run_id=task.id)
        execution.run_task = asyncio.create_task(run)
        if execution.stop_reason is not None:
            agent.cancel()
        try:
            result: agentkit.RunResult | None = await execution.run_task
        except asyncio.CancelledError:
            if execution.stop_reason is None:
                raise  # we ourselves are being cancelled
            result = None
        await self._conclude(execution, result)

    async def _conclude(self, execution: _Execution, result: agentkit.RunResult | None) -> None:
        task = execution.task
        if result is not None:
            execution.usage = result.usage
            execution.steps = len(result.steps) or execution.steps
        reason = execution.stop_reason
        if reason == "shutdown":
            await self._hand_back(execution)
            return
        if reason in ("cancelled", "lost") or result is None:
            # Someone else decided the task's fate (a cancel, or another worker that took over
            # an expired lease): write nothing more to it.
            log.info("task %s: agent stopped (%s)", task.id, reason)
            return
        status = result.status
        if status is agentkit.RunStatus.INPUT_REQUIRED and result.pending is not None:
            timeout_s = self.config.opspawn.approvals.timeout_s
            request = approval_request(task, result.pending, timeout_s)
            waiting = f"waiting for a person to approve {request.tool} on {request.server}"
            await self._finish(execution, TaskStatus.INPUT_REQUIRED, approval=request, reason=waiting)
        elif status is agentkit.RunStatus.COMPLETED:
            spec = task.spec
            servers = list(self.config.mcp_servers) if spec.servers is None else spec.servers
            warning = completion_warning(result, servers)
            await self._finish(
                execution, TaskStatus.COMPLETED, result=result.output or "", reason=warning, warning=warning
            )
        elif status is agentkit.RunStatus.TIMED_OUT:
            await self._finish(
                execution,
                TaskStatus.FAILED,
                error=f"the agent did not finish within timeout_s={task.spec.timeout_s:g}s; "
                "raise timeout_s or split the goal into smaller tasks",
            )
        elif status is agentkit.RunStatus.CANCELLED:
            await self._finish(
                execution, TaskStatus.FAILED, error="the agent stopped without an answer (cancelled)"
            )
        else:
            error = result.error or "the agent failed without saying why"
            await self._finish(execution, TaskStatus.FAILED, error=f"the agent failed: {error}")

    async def _finish(
        self,
        execution: _Execution,
        status: TaskStatus,
        *,
        approval: ApprovalRequest | None = None,
        **outcome: Unpack[Outcome],
    ) -> None:
        """The owner-guarded transition that ends this run (with its steps, its usage and the
        journal entries still held); losing the race (cancel, lost lease) is fine. ``reason``
        goes into the state event; ``warning`` is stored on the task (``outcome``); ``approval``
        pauses the task on that request, announced by an ``input_required`` event."""
        task_id = execution.task.id
        announce = ("input_required", approval.model_dump(mode="json")) if approval is not None else None
        with contextlib.suppress(OpspawnError):
            await self.store.record_progress(task_id, execution.steps, execution.usage)
        try:
            finished = await self.store.transition(
                task_id,
                {TaskStatus.RUNNING},
                status,
                usage=execution.usage,
                owner=execution.owner,
                approval=approval,
                event=announce,
                entries=execution.journal.take(),
                **outcome,
            )
        except IllegalTransition:
            log.info("task %s: not %s, it changed meanwhile (cancelled or taken over)", task_id, status)
            return
        task_finished(finished)
        error = outcome.get("error")
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
            # Unpublished if this fails: a recovery loop publishes it once the broker answers.
            await publish(self.store, self._enqueue, task_id)

    async def _on_agent_event(self, execution: _Execution, event: agentkit.AgentEvent) -> None:
        """One agent event, its pending journal entries and the progress so far: one write."""
        if execution.stop_reason is not None:
            return
        kind: str = event.kind
        data: dict[str, Any] = {"step": event.step, **_jsonable(dict(event.data))}
        if kind not in EVENT_KINDS or kind == "state":
            data["agent_event"] = kind
            kind = "log"
        if "usage" in event.data:
            # "llm" events carry one call's usage; "final"/"error" carry the run's total.
            usage = Usage.model_validate(event.data["usage"])
            execution.usage = execution.usage + usage if kind == "llm" else usage
        execution.steps = max(execution.steps, event.step)
        await self._write(execution, kind, data)

    async def _write(self, execution: _Execution, kind: str, data: dict[str, Any]) -> TaskEvent | None:
        """Write the event with the journal entries waiting for it, while we hold the task.

        While the store is down, an event that carries journal entries is retried until it is
        written or the task is lost: the agent must not act on a fact that is not durable (it
        waits here). A plain event (progress, log) is dropped instead. None: not ours any more
        (the agent has been told to stop)."""
        task_id = execution.task.id
        async with execution.writing:
            entries = execution.journal.take()
            while True:
                try:
                    written = await self.store.record(
                        task_id,
                        execution.owner,
                        kind,
                        data,
                        steps=execution.steps,
                        usage=execution.usage,
                        entries=entries,
                    )
                    break
                except Conflict:
                    # The task was cancelled between our lease check and this write; its log is
                    # closed, so the agent stops here.
                    execution.stop("cancelled")
                    return None
                except Unavailable as exc:
                    if not entries or execution.stop_reason is not None:
                        log.warning("task %s: could not record a %s event: %s", task_id, kind, exc)
                        return None
                    log.warning("task %s: store unavailable, retrying a journal write: %s", task_id, exc)
                    await asyncio.sleep(STORE_RETRY_S)
        if written is None:
            await self._not_ours(execution)
        return written

    async def _not_ours(self, execution: _Execution) -> None:
        """The task is not running under our lease any more: stop, saying why."""
        try:
            current = await self.store.get(execution.task.id)
        except OpspawnError:
            execution.stop("lost")
            return
        execution.stop("cancelled" if current.status is TaskStatus.CANCELLED else "lost")

    async def _renew_forever(self) -> None:
        """Renew every lease of this runner in one statement, every third of the TTL (at most
        every second, so a cancel is seen quickly even during a long tool call); a task whose
        lease was not renewed was cancelled or taken over, and its agent is stopped."""
        interval = min(self._ttl / 3, 1.0)
        while True:
            await asyncio.sleep(interval)
            executions = [e for e in self._running.values() if e.stop_reason is None]
            if not executions:
                continue
            try:
                held = await self.store.renew_many({e.task.id: e.owner for e in executions}, self._ttl)
            except Exception as exc:
                # Keep trying: while the store is unreachable nobody else can take the tasks
                # over either, and the owner-guarded final transition settles any doubt.
                log.warning("lease renewal failed, retrying: %s", exc)
                continue
            for execution in executions:
                if execution.task.id not in held:
                    await self._not_ours(execution)
