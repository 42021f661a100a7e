"""Running agent tasks: the actor ``execute_agent_task_actor``, and the two ways to host it.

**The actor body** is ``TaskRunner.execute(task_id)``. It is idempotent, because delivery is at
least once: it *claims* the task in the store (``queued -> running`` with a lease, or a running
task whose lease expired), and does nothing if the claim is refused (finished, cancelled, or
held by a live worker). While the agent runs, a heartbeat renews the lease; each agent step is
written as a task event plus ``record_progress``. The run ends with ``completed`` + result or
``failed`` + a reason a human can act on, both as a compare-and-set guarded by the lease owner,
so a worker that lost its lease (or a task cancelled meanwhile) can never overwrite the truth.
Nothing escapes as an exception: a tool error is an observation for the model (agentkit), an
LLM failure or a bug is a ``failed`` task with its reason.

**Cancellation** is a store transition made by ``TaskService.cancel``. A queued task then never
starts (``claim`` refuses it). A running one learns it on its next agent event or heartbeat
(``renew`` refuses a task that is no longer running), whichever comes first, and calls
``agent.cancel()``: it stops within one step, and the in-flight tool call is cancelled.

**Where the actor runs.** asyncio objects (the store's engine, the MCP pool's sessions) belong
to the loop that created them, so the runner, the store and the pool always share one loop:

* ``opspawn-mcp worker`` (``run_worker_process``): Dramatiq with RabbitMQ. The ``AsyncIO``
  middleware runs one event loop thread; ``execute_agent_task_actor`` is an ``async def`` actor,
  so each of the ``concurrency`` worker threads only waits while its coroutine runs on that one
  loop. At worker boot we open the store and the ``OpsMcpClient`` *on that loop*, in one
  long-lived task that owns them (anyio scopes must exit in the task that entered them), and
  every task of the process shares the pool's downstream connections.
* ``opspawn-mcp serve`` with ``broker_url: embedded`` (``EmbeddedWorker``): the server already
  has a loop with its store and pool. A ``StubBroker`` + Dramatiq worker would run the actor on
  Dramatiq's own loop thread, where the server's store and pool cannot be used (and a
  ``memory://`` store cannot be shared at all). So the embedded worker is a small in-process
  queue consumed by ``concurrency`` tasks on the server's loop, calling the same
  ``TaskRunner.execute``: same claim, lease, events and recovery; no threads, no broker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from types import FrameType, TracebackType
from typing import Any

from opspawn_mcp.agent_factory import AgentSetupError, build_agent, close_llm
from opspawn_mcp.broker import (
    ACTOR_NAME,
    DramatiqEnqueuer,
    build_rabbitmq_broker,
    is_embedded,
    queue_name_for,
)
from opspawn_mcp.config import Config
from opspawn_mcp.errors import Conflict, IllegalTransition, OpspawnError, TaskNotFound, Unavailable
from opspawn_mcp.models import Task, TaskStatus, Usage, utcnow
from opspawn_mcp.recovery import (
    STALE_QUEUED_S,
    give_up,
    recovery_interval,
    recovery_loop,
    requeue_stale,
)
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

__all__ = [
    "EmbeddedWorker",
    "TaskRunner",
    "execute_agent_task_actor",
    "new_owner_id",
    "run_worker_process",
]


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


# -- embedded: inside `opspawn-mcp serve` ------------------------------------------------------


class EmbeddedWorker:
    """The worker inside ``opspawn-mcp serve`` when ``broker_url`` is ``embedded``; also the
    ``scheduler.Enqueuer`` for that server. Use on the server's loop, with its store and pool::

        async with EmbeddedWorker(config, store, pool) as worker:
            service = TaskService(config, store, worker, ...)   # worker.enqueue(task_id)

    On enter it re-enqueues every ``queued`` task (their messages died with the previous
    process) and starts the recovery loop; on exit it stops running agents and hands their
    tasks back as ``queued``, so the next start runs them again.
    """

    def __init__(self, config: Config, store: TaskStore, pool: Any, *, owner: str | None = None) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self._owner = owner
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: TaskRunner | None = None
        self._closed = True

    @property
    def runner(self) -> TaskRunner:
        if self._runner is None:
            raise RuntimeError("EmbeddedWorker is not started; use it as an async context manager")
        return self._runner

    async def enqueue(self, task_id: str) -> None:
        """Queue the id for this process; after exit, refuse (the task stays queued in the store)."""
        if self._closed:
            raise Unavailable("The embedded worker is stopped; the task stays queued until the next start.")
        self._queue.put_nowait(task_id)

    async def ping(self) -> None:
        """Ready while the consumers run; they live on this loop, so there is nothing to reach."""
        if self._closed or any(t.done() for t in self._tasks):
            raise Unavailable("The embedded worker is not running; restart opspawn-mcp serve.")

    async def __aenter__(self) -> EmbeddedWorker:
        settings = self.config.opspawn.worker
        self._runner = TaskRunner(
            self.config, self.store, self.pool, self.enqueue, owner=self._owner, requeue_on_shutdown=False
        )
        self._closed = False
        for i in range(settings.concurrency):
            self._tasks.append(asyncio.create_task(self._consume(), name=f"opspawn-embedded-{i}"))
        self._tasks.append(
            asyncio.create_task(
                recovery_loop(
                    self.store, self.enqueue, settings.max_attempts, recovery_interval(settings.lease_ttl_s)
                ),
                name="opspawn-recovery",
            )
        )
        try:
            # Nothing else consumes this queue, so every queued task is ours to restart.
            await requeue_stale(self.store, self.enqueue, older_than_s=0.0)
        except OpspawnError as exc:
            log.warning("could not re-enqueue queued tasks at start: %s", exc)
        return self

    async def _consume(self) -> None:
        while True:
            task_id = await self._queue.get()
            try:
                await self.runner.execute(task_id)
            except Exception:
                # The store failed at claim time; the task stays queued or its lease expires,
                # and the recovery loop brings it back.
                log.exception("task %s could not be started", task_id)
            finally:
                self._queue.task_done()

    async def join(self) -> None:
        """Wait until every id enqueued so far has been processed (run, or found not ours)."""
        await self._queue.join()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        runner = self.runner
        runner.begin_shutdown()
        await runner.wait_idle()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


# -- a worker process: `opspawn-mcp worker` with RabbitMQ ---------------------------------------

# The runner of this process, published by the boot task on Dramatiq's event loop. A future
# (not a plain global) because a message can arrive while the store and pool are still opening.
_process_runner: concurrent.futures.Future[TaskRunner] | None = None


async def execute_agent_task_actor(task_id: str) -> None:
    """The Dramatiq actor: run one task by id (see ``TaskRunner.execute``).

    Declared on the broker by ``run_worker_process`` as ``execute_agent_task_actor``; runs on
    the AsyncIO middleware's loop, where this process's store and MCP pool live.
    """
    slot = _process_runner
    if slot is None:
        raise RuntimeError("execute_agent_task_actor runs only inside `opspawn-mcp worker`")
    runner = await asyncio.wrap_future(slot)
    await runner.execute(task_id)


class _ProcessHost:
    """Owns the worker process's store, pool and runner, in one task on Dramatiq's loop."""

    def __init__(self, config: Config, broker: Any) -> None:
        self.config = config
        self.broker = broker
        self.runner: concurrent.futures.Future[TaskRunner] = concurrent.futures.Future()
        self.done: concurrent.futures.Future[None] | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.done = asyncio.run_coroutine_threadsafe(self._main(), loop)

    async def _main(self) -> None:
        from opspawn_mcp.host import OpsMcpClient
        from opspawn_mcp.store import open_store

        self._stop = asyncio.Event()
        settings = self.config.opspawn.worker
        try:
            store = open_store(self.config.opspawn.store_url)
            await store.start()
        except BaseException as exc:
            self.runner.set_exception(exc)
            raise
        try:
            async with OpsMcpClient(self.config.mcp_servers) as pool:
                enqueuer = DramatiqEnqueuer(self.broker, queue_name_for(self.config))
                runner = TaskRunner(self.config, store, pool, enqueuer.enqueue)
                recovery = asyncio.create_task(
                    recovery_loop(
                        store,
                        enqueuer.enqueue,
                        settings.max_attempts,
                        recovery_interval(settings.lease_ttl_s),
                    )
                )
                try:
                    await requeue_stale(store, enqueuer.enqueue, older_than_s=STALE_QUEUED_S)
                    self.runner.set_result(runner)
                    await self._stop.wait()
                    runner.begin_shutdown()
                    await runner.wait_idle()
                finally:
                    recovery.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await recovery
                    await enqueuer.aclose()
        except BaseException as exc:
            if not self.runner.done():
                self.runner.set_exception(exc)
            raise
        finally:
            await store.close()

    def begin_shutdown(self) -> None:
        """From any thread: stop running agents and hand their tasks back."""
        if self._loop is not None and self.runner.done() and self.runner.exception() is None:
            self._loop.call_soon_threadsafe(self.runner.result().begin_shutdown)

    def close(self) -> None:
        """From any thread: release the store and pool, waiting until they are closed."""
        if self._loop is None or self.done is None:
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        with contextlib.suppress(Exception):
            self.done.result()


def _runtime_middleware(host: _ProcessHost) -> Any:
    """Boots the host right after the AsyncIO loop starts, and closes it before the loop stops
    (``after_*`` hooks run in reverse order, so this must come after ``AsyncIO`` in the list)."""
    from dramatiq import Middleware
    from dramatiq.asyncio import get_event_loop_thread

    class _Runtime(Middleware):
        def after_worker_boot(self, broker: Any, worker: Any) -> None:
            thread = get_event_loop_thread()
            if thread is None:
                raise RuntimeError("the AsyncIO middleware must come before the runtime middleware")
            host.start(thread.loop)

        def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
            host.close()

    return _Runtime()


def _rabbitmq_problem(broker: Any) -> str | None:
    """One connection attempt up front, so a wrong URL is one clear line, not endless retries."""
    import pika
    import pika.exceptions

    try:
        pika.BlockingConnection(broker.parameters).close()
    except pika.exceptions.AMQPError as exc:
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    except OSError as exc:
        return str(exc)
    return None


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{creds}@{host}"
    return url


def run_worker_process(config: Config, stop: threading.Event | None = None) -> int:
    """``opspawn-mcp worker``: consume tasks from RabbitMQ until SIGTERM/SIGINT (or ``stop``).

    Returns the exit code. Shutdown is graceful: running agents are stopped and their tasks
    handed back to the queue for another worker; nothing is left half-written.
    """
    global _process_runner
    import dramatiq
    from dramatiq.middleware.asyncio import AsyncIO

    if is_embedded(config):
        print(
            "opspawn-mcp: the embedded broker runs inside `opspawn-mcp serve`; set opspawn.broker_url "
            "to amqp://... to run separate workers",
            file=sys.stderr,
        )
        return 2
    stop = stop or threading.Event()
    broker = build_rabbitmq_broker(config.opspawn.broker_url, middleware=[AsyncIO()])
    problem = _rabbitmq_problem(broker)
    if problem is not None:
        print(
            f"opspawn-mcp: cannot reach RabbitMQ at {_redact(config.opspawn.broker_url)} ({problem}); "
            "check that it is running and that opspawn.broker_url is right",
            file=sys.stderr,
        )
        return 2
    host = _ProcessHost(config, broker)
    broker.add_middleware(_runtime_middleware(host))
    _process_runner = host.runner
    queue = queue_name_for(config)
    actor_fn: Any = execute_agent_task_actor
    dramatiq.Actor(actor_fn, broker=broker, actor_name=ACTOR_NAME, queue_name=queue, priority=0, options={})
    concurrency = config.opspawn.worker.concurrency
    worker = dramatiq.Worker(broker, worker_threads=concurrency, worker_timeout=1000)
    # Prefetch no more than we can run: an agent task lasts seconds to hours, so a message
    # buffered behind busy threads would wait while another worker sits idle.
    worker.queue_prefetch = concurrency

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    worker.start()
    try:
        host.runner.result()
    except BaseException as exc:
        print(f"opspawn-mcp: the worker cannot start: {exc}", file=sys.stderr)
        worker.stop()
        broker.close()
        return 2
    print(
        f"opspawn-mcp worker ready: queue {queue!r}, concurrency {config.opspawn.worker.concurrency}, "
        f"owner {host.runner.result().owner}",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    print("opspawn-mcp worker: shutting down", file=sys.stderr, flush=True)
    host.begin_shutdown()
    worker.stop()
    broker.close()
    return 0
