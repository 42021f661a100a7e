"""``opspawn-mcp worker``: a process that runs agent tasks from RabbitMQ.

Dramatiq's ``AsyncIO`` middleware runs the ``async def`` actor on one loop, which owns the
process's store and pool. See docs/workers.md, "RabbitMQ workers".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
from types import FrameType

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware.asyncio import AsyncIO

from opspawn_mcp.broker import (
    ACTOR_NAME,
    DramatiqEnqueuer,
    build_rabbitmq_broker,
    is_embedded,
    queue_name_for,
)
from opspawn_mcp.config import Config, redact_url
from opspawn_mcp.recovery import recovery_interval, recovery_loop
from opspawn_mcp.runner import TaskRunner
from opspawn_mcp.service import TaskService
from opspawn_mcp.telemetry.http import METRICS_PATH, worker_metrics
from opspawn_mcp.telemetry.logs import announce

__all__ = ["execute_agent_task_actor", "run_worker_process"]

log = logging.getLogger(__name__)

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

    def __init__(self, config: Config, broker: RabbitmqBroker) -> None:
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
        from opspawn_mcp.chaining import ProcessChain
        from opspawn_mcp.host import OpsMcpClient
        from opspawn_mcp.store import open_store

        chain = ProcessChain(self.config)

        self._stop = asyncio.Event()
        settings = self.config.opspawn.worker
        enqueuer = DramatiqEnqueuer(self.broker, queue_name_for(self.config))
        try:
            store = open_store(
                self.config.opspawn.store_url,
                settings=self.config.opspawn.store,
                concurrency=self.config.opspawn.worker.concurrency,
            )
            await store.start()
        except BaseException as exc:
            self.runner.set_exception(exc)
            raise
        try:
            async with (
                OpsMcpClient(
                    self.config.mcp_servers,
                    default_concurrency=self.config.opspawn.worker.concurrency,
                    stdio_env=chain.stdio_env,
                ) as pool,
                TaskRunner(self.config, store, pool, enqueuer.enqueue) as runner,
                worker_metrics(self.config, TaskService(self.config, store, enqueuer, pool)) as metrics_url,
            ):
                if metrics_url is not None:
                    announce(f"opspawn-mcp worker: metrics at {metrics_url}{METRICS_PATH}")
                recovery = asyncio.create_task(
                    recovery_loop(
                        store,
                        runner.resume,
                        enqueuer.enqueue,
                        settings.max_attempts,
                        recovery_interval(settings.lease_ttl_s),
                    )
                )
                try:
                    # Sessions open now, not on the first task: its first call would wait for them
                    # (unless an opspawn chain started this process: opspawn_mcp.chaining).
                    if chain.connect_at_start:
                        await pool.open_all()
                    else:
                        log.warning("this worker was %s", chain.refusal)
                    self.runner.set_result(runner)
                    await self._stop.wait()
                    runner.begin_shutdown()
                    await runner.wait_idle()
                finally:
                    # Wait for the cancel to land; unlike suppress(CancelledError), a cancel of
                    # this task itself still propagates (recovery_loop logs its own failures).
                    recovery.cancel()
                    await asyncio.gather(recovery, return_exceptions=True)
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


class _Runtime(dramatiq.Middleware):
    """Boots the host right after the AsyncIO loop starts, and closes it before the loop stops
    (``after_*`` hooks run in reverse order, so this must come after ``AsyncIO`` in the list)."""

    def __init__(self, host: _ProcessHost) -> None:
        self.host = host

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        thread = get_event_loop_thread()
        if thread is None:
            raise RuntimeError("the AsyncIO middleware must come before the runtime middleware")
        self.host.start(thread.loop)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.host.close()


def _rabbitmq_problem(broker: RabbitmqBroker) -> str | None:
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


def run_worker_process(config: Config, stop: threading.Event | None = None) -> int:
    """``opspawn-mcp worker``: consume tasks from RabbitMQ until SIGTERM/SIGINT (or ``stop``).

    Returns the exit code. Shutdown is graceful: running agents are stopped and their tasks
    handed back to the queue for another worker; nothing is left half-written.
    """
    global _process_runner
    if is_embedded(config):
        announce(
            "opspawn-mcp: the embedded broker runs inside `opspawn-mcp serve`; set opspawn.broker_url "
            "to amqp://... to run separate workers",
            level=logging.ERROR,
        )
        return 2
    stop = stop or threading.Event()
    broker = build_rabbitmq_broker(config.opspawn.broker_url, middleware=[AsyncIO()])
    problem = _rabbitmq_problem(broker)
    if problem is not None:
        announce(
            f"opspawn-mcp: cannot reach RabbitMQ at {redact_url(config.opspawn.broker_url)} ({problem}); "
            "check that it is running and that opspawn.broker_url is right",
            level=logging.ERROR,
        )
        return 2
    host = _ProcessHost(config, broker)
    broker.add_middleware(_Runtime(host))
    _process_runner = host.runner
    queue = queue_name_for(config)
    dramatiq.Actor[[str], None](
        execute_agent_task_actor,
        broker=broker,
        actor_name=ACTOR_NAME,
        queue_name=queue,
        priority=0,
        options={},
    )
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
        announce(f"opspawn-mcp: the worker cannot start: {exc}", level=logging.ERROR)
        worker.stop()
        broker.close()
        return 2
    announce(
        f"opspawn-mcp worker ready: queue {queue!r}, concurrency {config.opspawn.worker.concurrency}, "
        f"owner {host.runner.result().owner}"
    )
    stop.wait()
    announce("opspawn-mcp worker: shutting down")
    host.begin_shutdown()
    worker.stop()
    broker.close()
    return 0
