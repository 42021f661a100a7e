"""The worker inside ``opspawn-mcp serve`` when ``broker_url`` is ``embedded``.

An in-process queue consumed on the server's own loop by ``TaskRunner.execute``, the actor body,
with no threads and no broker. See docs/workers.md, "The embedded worker".
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from opspawn_mcp.agent_factory import ToolPool
from opspawn_mcp.config import Config
from opspawn_mcp.errors import OpspawnError, Unavailable
from opspawn_mcp.recovery import recovery_interval, recovery_loop, requeue_stale
from opspawn_mcp.runner import TaskRunner
from opspawn_mcp.store.base import TaskStore
from opspawn_mcp.telemetry import tracing

log = logging.getLogger(__name__)

SYSTEM = "opspawn.embedded"
QUEUE_NAME = "embedded"
"""How traces name this queue (``messaging.system``, ``messaging.destination.name``)."""


class EmbeddedWorker:
    """The worker inside ``opspawn-mcp serve`` when ``broker_url`` is ``embedded``; also the
    ``scheduler.Enqueuer`` for that server. Use on the server's loop, with its store and pool::

        async with EmbeddedWorker(config, store, pool) as worker:
            service = TaskService(config, store, worker, ...)   # worker.enqueue(task_id)

    On enter it re-enqueues every ``queued`` task (their messages died with the previous
    process) and starts the recovery loop; on exit it stops running agents and hands their
    tasks back as ``queued``, so the next start runs them again.
    """

    def __init__(self, config: Config, store: TaskStore, pool: ToolPool, *, owner: str | None = None) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self._owner = owner
        self._queue: asyncio.Queue[tuple[str, dict[str, str] | None]] = asyncio.Queue()
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
        with tracing.publishing(SYSTEM, QUEUE_NAME, task_id):
            self._queue.put_nowait((task_id, tracing.outgoing()))

    async def ping(self) -> None:
        """Ready while the consumers run; they live on this loop, so there is nothing to reach."""
        if self._closed or any(t.done() for t in self._tasks):
            raise Unavailable("The embedded worker is not running; restart opspawn-mcp serve.")

    async def __aenter__(self) -> EmbeddedWorker:
        settings = self.config.opspawn.worker
        runner = TaskRunner(
            self.config, self.store, self.pool, self.enqueue, owner=self._owner, requeue_on_shutdown=False
        )
        self._runner = await runner.__aenter__()
        self._closed = False
        for i in range(settings.concurrency):
            self._tasks.append(asyncio.create_task(self._consume(), name=f"opspawn-embedded-{i}"))
        self._tasks.append(
            asyncio.create_task(
                recovery_loop(
                    self.store,
                    runner.resume,
                    self.enqueue,
                    settings.max_attempts,
                    recovery_interval(settings.lease_ttl_s),
                ),
                name="opspawn-recovery",
            )
        )
        try:
            # Nothing else consumes this queue, so every queued task is ours to restart.
            await requeue_stale(self.store, self.enqueue)
        except OpspawnError as exc:
            log.warning("could not re-enqueue queued tasks at start: %s", exc)
        return self

    async def _consume(self) -> None:
        while True:
            task_id, trace_context = await self._queue.get()
            try:
                with tracing.processing(trace_context, SYSTEM, QUEUE_NAME, task_id):
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
        await runner.__aexit__(exc_type, exc, tb)
