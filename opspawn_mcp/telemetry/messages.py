"""The trace context in Dramatiq messages: injected on enqueue, extracted in the worker.

See docs/operations.md, "Traces" (how the context crosses the queue).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any

from dramatiq import Middleware

from opspawn_mcp.telemetry import tracing

TRACE_OPTION = "trace_context"
SYSTEM = "rabbitmq"


class TraceContext(Middleware):
    """Carries the trace context across RabbitMQ (see the module docstring)."""

    def __init__(self) -> None:
        self._current = threading.local()

    def before_enqueue(self, broker: Any, message: Any, delay: int | None) -> None:
        carrier = tracing.outgoing()
        if carrier is not None:
            message.options[TRACE_OPTION] = carrier

    def before_process_message(self, broker: Any, message: Any) -> None:
        if not tracing.enabled():
            return
        task_id = str(message.args[0]) if message.args else ""
        scope = tracing.processing(message.options.get(TRACE_OPTION), SYSTEM, message.queue_name, task_id)
        scope.__enter__()
        self._current.scope = scope

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        scope: AbstractContextManager[Any] | None = getattr(self._current, "scope", None)
        if scope is None:
            return
        self._current.scope = None
        if exception is None:
            scope.__exit__(None, None, None)
        else:
            scope.__exit__(type(exception), exception, exception.__traceback__)

    after_skip_message = after_process_message
