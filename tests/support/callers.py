"""MCP callers for agentkit's tests, over a real in-memory ``mcp.Client`` session; the check that
a failed pool call reached its caller as the one ``ToolError``; a downstream task's status as
its server reports it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import mcp.types as types
import pytest
from mcp import Client
from mcp.client.extension import advertise

from agentkit import ToolError
from opspawn_mcp.mcp_tasks import TASKS_EXTENSION, DetailedTask, GetTaskRequest
from opspawn_mcp.mcp_tasks.wire import TaskIdParams

E = TypeVar("E", bound=BaseException)


class OldCaller:
    """A caller written before agentkit's optional keywords (``progress_callback``, ``meta``):
    the MCP tools must keep working with it, only without progress or idempotency keys."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def list_tools(self, server: str) -> list[types.Tool]:
        return list((await self.client.list_tools()).tools)

    async def call_tool(self, server: str, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        return await self.client.call_tool(tool, arguments)


class FailedCall(Generic[E]):
    """What ``call_fails`` caught: ``error`` (the ``ToolError``) and ``value``, the pool's typed error behind it."""

    error: ToolError
    value: E


@contextmanager
def call_fails(kind: type[E]) -> Iterator[FailedCall[E]]:
    """Expect a pool call to raise ``ToolError`` caused by a ``kind`` error, with its message unchanged."""
    failed: FailedCall[E] = FailedCall()
    with pytest.raises(ToolError) as caught:
        yield failed
    cause = caught.value.__cause__
    assert isinstance(cause, kind), f"expected a {kind.__name__} behind {caught.value!r}, got {cause!r}"
    assert caught.value.message == str(cause), "the model must read the pool's message as it is"
    failed.error, failed.value = caught.value, cause


async def task_status(url: str, task_id: str) -> str:
    """A task's status as the MCP server at ``url`` reports it to a client of its own (``tasks/get``)."""
    async with Client(url, extensions=[advertise(TASKS_EXTENSION)]) as client:
        request = GetTaskRequest(params=TaskIdParams(task_id=task_id))
        task = await client.session.send_request(request, DetailedTask)
        return task.status
