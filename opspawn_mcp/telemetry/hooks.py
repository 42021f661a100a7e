"""The hooks the runtime calls: a task's run, a model call, a downstream call, a finished task.

Each does the span, the metrics and the log context of its moment in one line at the call site.
See docs/operations.md, "Traces".
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import mcp.types as types
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from agentkit.errors import ToolError
from agentkit.llm import LLM, ChatRequest, LLMResponse, LLMWrapper
from opspawn_mcp.errors import OpspawnError
from opspawn_mcp.models import Task
from opspawn_mcp.telemetry import metrics, tracing
from opspawn_mcp.telemetry.logs import task_context

Runner = TypeVar("Runner")


def runs_task(
    execute: Callable[[Runner, str], Awaitable[None]],
) -> Callable[[Runner, str], Coroutine[Any, Any, None]]:
    """Decorates ``execute(self, task_id)``: everything it does, and every task it starts, logs
    with the task id and (tracing on) is a child of one ``run task`` span."""

    @functools.wraps(execute)
    async def run(self: Runner, task_id: str) -> None:
        with task_context(task_id), tracing.span("run task", attributes={tracing.TASK_ID: task_id}):
            await execute(self, task_id)

    return run


def task_finished(task: Task) -> None:
    """A worker moved ``task`` to its final state."""
    if task.finished_at is not None:
        seconds = (task.finished_at - task.created_at).total_seconds()
        metrics.TASK_DURATION.labels(task.status.value).observe(max(seconds, 0.0))
    if tracing.enabled():
        trace.get_current_span().set_attribute("opspawn.task.status", task.status.value)


class ObservedLLM(LLMWrapper):
    """A model client whose every ``chat`` is counted (calls, latency, tokens) and, tracing on,
    a ``chat {model}`` client span with the GenAI semantic conventions' attributes."""

    def __init__(self, llm: LLM, profile: str, model: str | None) -> None:
        super().__init__(llm)
        self._profile = profile
        self._model = model or profile

    async def complete(self, request: ChatRequest) -> LLMResponse:
        attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": self._model}
        started = time.perf_counter()
        outcome = "error"
        try:
            with tracing.span(f"chat {self._model}", kind=SpanKind.CLIENT, attributes=attributes) as span:
                response = await self.inner.complete(request)
                if span is not None:
                    span.set_attributes(
                        {
                            "gen_ai.usage.input_tokens": response.usage.input_tokens,
                            "gen_ai.usage.output_tokens": response.usage.output_tokens,
                            "gen_ai.response.finish_reasons": [response.finish_reason or "unknown"],
                        }
                    )
            outcome = "ok"
        finally:
            metrics.LLM_CALLS.labels(self._profile, outcome).inc()
            metrics.LLM_CALL_DURATION.labels(self._profile).observe(time.perf_counter() - started)
        metrics.LLM_TOKENS.labels(self._profile, "input").inc(response.usage.input_tokens)
        metrics.LLM_TOKENS.labels(self._profile, "output").inc(response.usage.output_tokens)
        return response


async def downstream_call(
    server: str, tool: str, call: Callable[[], Awaitable[types.CallToolResult]]
) -> types.CallToolResult:
    """One downstream tool call through the pool: counted by server and outcome (``ok``;
    ``tool_error``: the tool or server refused it; ``error``: the pool could not get an answer,
    its ``Unavailable`` is the ``ToolError``'s cause), timed, and (tracing on) an
    ``execute_tool`` span, the parent of the MCP SDK's ``MCP send`` span."""
    attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool, "opspawn.server": server}
    started = time.perf_counter()
    outcome = "error"
    try:
        with tracing.span(f"execute_tool {server}.{tool}", attributes=attributes) as span:
            try:
                result = await call()
            except ToolError as exc:
                outcome = "error" if isinstance(exc.__cause__, OpspawnError) else "tool_error"
                if span is not None:
                    span.set_attribute("error.type", outcome)
                raise
        outcome = "ok"
        return result
    finally:
        metrics.DOWNSTREAM_CALLS.labels(server, outcome).inc()
        metrics.DOWNSTREAM_CALL_DURATION.labels(server).observe(time.perf_counter() - started)
