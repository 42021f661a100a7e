"""The message broker: how a task id travels from the scheduler to a worker.

Dramatiq's ``RabbitmqBroker`` (``DramatiqEnqueuer``) for ``amqp://...``, the embedded queue
otherwise; a message carries only the task id. See docs/workers.md, "RabbitMQ workers".
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware.asyncio import AsyncIO

from opspawn_mcp.config import Config
from opspawn_mcp.errors import Unavailable
from opspawn_mcp.telemetry import tracing
from opspawn_mcp.telemetry.messages import SYSTEM, TraceContext

ACTOR_NAME = "execute_agent_task_actor"

__all__ = [
    "ACTOR_NAME",
    "DramatiqEnqueuer",
    "build_rabbitmq_broker",
    "is_embedded",
    "queue_name_for",
]


def is_embedded(config: Config) -> bool:
    return config.opspawn.broker_url == "embedded"


def queue_name_for(config: Config) -> str:
    """The RabbitMQ queue the server publishes to and the workers consume.

    One name per deployment; tests use a unique one per run so parallel runs against one
    RabbitMQ never steal each other's messages.
    """
    return config.opspawn.worker.queue_name


def build_rabbitmq_broker(url: str, middleware: list[dramatiq.Middleware] | None = None) -> RabbitmqBroker:
    """A ``RabbitmqBroker`` with only the middleware we want (see the module docstring).

    ``confirm_delivery`` makes a publish wait for RabbitMQ's ack, so ``enqueue`` returning
    means the message is durable, and a deleted queue is re-declared instead of the message
    silently vanishing. ``TraceContext`` carries the trace context in every message (a no-op
    while tracing is off).
    """
    stack = middleware if middleware is not None else [AsyncIO()]
    return RabbitmqBroker(url=url, confirm_delivery=True, middleware=[*stack, TraceContext()])


def task_message(queue_name: str, task_id: str) -> dramatiq.Message[None]:
    """The one message shape: the actor's name and the task id, nothing else."""
    return dramatiq.Message(
        queue_name=queue_name, actor_name=ACTOR_NAME, args=(task_id,), kwargs={}, options={}
    )


class DramatiqEnqueuer:
    """``scheduler.Enqueuer`` over a Dramatiq broker (RabbitMQ in production).

    Pika's ``BlockingConnection`` blocks and is bound to a thread, so every publish runs on one
    dedicated thread: the event loop never blocks, and the process holds one publishing
    connection instead of one per thread of the default executor. Safe to call from any loop.

    Use ``DramatiqEnqueuer.for_config(config)`` in the server (it owns the broker and closes
    it in ``close()``), or pass an existing broker (the worker process shares its own).
    """

    def __init__(self, broker: RabbitmqBroker, queue_name: str, *, owns_broker: bool = False) -> None:
        self._broker = broker
        self._queue_name = queue_name
        self._owns_broker = owns_broker
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opspawn-publish")

    @classmethod
    def for_config(cls, config: Config) -> DramatiqEnqueuer:
        if is_embedded(config):
            raise ValueError("broker_url is 'embedded': use worker.EmbeddedWorker as the enqueuer instead")
        broker = build_rabbitmq_broker(config.opspawn.broker_url)
        return cls(broker, queue_name_for(config), owns_broker=True)

    @property
    def queue_name(self) -> str:
        return self._queue_name

    def _publish(self, task_id: str) -> None:
        self._broker.enqueue(task_message(self._queue_name, task_id))

    async def enqueue(self, task_id: str) -> None:
        """Publish the id; raise ``Unavailable`` when RabbitMQ cannot take it.

        The scheduler logs that and moves on: the task is already ``queued`` in the store and
        the recovery loop of any worker re-enqueues it once it looks stale.
        """
        loop = asyncio.get_running_loop()
        try:
            with tracing.publishing(SYSTEM, self._queue_name, task_id):
                # In the caller's context, so the message carries the producer span's.
                publish = contextvars.copy_context().run
                await loop.run_in_executor(self._executor, publish, self._publish, task_id)
        except dramatiq.BrokerError as exc:
            raise Unavailable(
                f"RabbitMQ did not accept the message for task {task_id} ({exc}); "
                "check that RabbitMQ is running and opspawn.broker_url is right."
            ) from exc

    def _check_connection(self) -> None:
        connection = self._broker.connection
        if connection.is_closed:
            del self._broker.connection  # the next use reconnects
            connection = self._broker.connection
        connection.process_data_events(time_limit=0)

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless the publishing connection to RabbitMQ is up (reopening
        it if it dropped), on the publishing thread, where pika wants it."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._check_connection)
        except Exception as exc:  # pika raises many unrelated types for "cannot reach"
            raise Unavailable(
                f"RabbitMQ cannot be reached ({type(exc).__name__}); check that it is running "
                "and that opspawn.broker_url is right."
            ) from exc

    async def aclose(self) -> None:
        """Close the publishing connection (on its own thread, where pika wants it)."""
        loop = asyncio.get_running_loop()
        if self._owns_broker:
            await loop.run_in_executor(self._executor, self._broker.close)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> DramatiqEnqueuer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
