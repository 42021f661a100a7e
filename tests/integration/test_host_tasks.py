"""Downstream MCP Tasks through the pool: the tasks conformance fixture over streamable HTTP and stdio.

The fixture runs opspawn's own tasks extension over its in-memory backend (``slow_compute``,
``failing_job``, ``protocol_error_job``, ``confirm_delete``); what happened to a task on the
fixture's side is read back there with ``tasks/get`` by a separate SDK client (over HTTP: a
stdio server's tasks live in the process only its pool talks to).
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import mcp.types as types
import pytest
from pydantic import TypeAdapter

from agentkit import ToolError
from opspawn_mcp.config import ServerConfig
from opspawn_mcp.host import OpsMcpClient
from tests.servers.harness import REPO_ROOT, wait_until
from tests.servers.tasks_conformance import spawn_tasks_fixture
from tests.support.callers import task_status

TASK_ID = re.compile(r"downstream task (\S+) ")


@pytest.fixture(scope="module")
def fixture_url() -> Iterator[str]:
    with spawn_tasks_fixture() as url:
        yield url


STDIO = {
    "command": sys.executable,
    "args": ["-m", "tests.servers.tasks_conformance", "--stdio"],
    "cwd": str(REPO_ROOT),
}


@pytest.fixture(params=["streamable-http", "stdio"])
def either(request: pytest.FixtureRequest, fixture_url: str) -> dict[str, object]:
    """The fixture's address over each transport it serves."""
    return {"url": fixture_url} if request.param == "streamable-http" else STDIO


@asynccontextmanager
async def pool_for(server: str | dict[str, object], **settings: object) -> AsyncIterator[OpsMcpClient]:
    """A pool with the fixture as server ``tasks`` (a URL, or ``either``), 2026-07-28, 1 s per call."""
    where = {"url": server} if isinstance(server, str) else server
    config = TypeAdapter(ServerConfig).validate_python(
        {**where, "protocol": "auto", "timeout_s": 1.0, **settings}
    )
    async with OpsMcpClient({"tasks": config}) as pool:
        yield pool


def _text(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


class Progress:
    """The progress the pool reports while it polls; the messages name the downstream task."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.messages.append(message or "")

    def task_id(self) -> str:
        found = TASK_ID.match(self.messages[0]) if self.messages else None
        assert found, self.messages
        return found.group(1)


async def test_a_task_longer_than_the_call_timeout_returns_its_result(either: dict[str, object]) -> None:
    async with pool_for(either) as pool:
        progress = Progress()
        result = await pool.call_tool(
            "tasks", "slow_compute", {"seconds": 2.5, "label": "long"}, progress_callback=progress
        )
        # 2.5 s of work under a 1 s per-call timeout: each tasks/get got 1 s, not the task.
        assert _text(result) == "computed 'long' in 2.5s"
        assert progress.messages[-1] == f"downstream task {progress.task_id()} completed"
        assert any(m.endswith(" working") for m in progress.messages)
        info = pool.servers_info()[0]
        assert (info.state, info.calls, info.errors) == ("ready", 1, 0)


async def test_without_auto_the_server_is_called_synchronously(fixture_url: str) -> None:
    async with pool_for(fixture_url, protocol="2025-11-25") as pool:
        progress = Progress()
        result = await pool.call_tool(
            "tasks", "slow_compute", {"seconds": 0.2, "label": "sync"}, progress_callback=progress
        )
        assert _text(result) == "computed 'sync' in 0.2s" and progress.messages == []


async def test_a_task_that_ends_without_a_result_is_one_tool_error(either: dict[str, object]) -> None:
    async with pool_for(either) as pool:
        with pytest.raises(ToolError) as tool_error:
            await pool.call_tool("tasks", "failing_job", {})
        assert tool_error.value.message == (
            "The tool tasks/failing_job reported an error: failing_job failed, as it always does"
        )
        with pytest.raises(ToolError) as failed:
            await pool.call_tool("tasks", "protocol_error_job", {})
        assert re.fullmatch(
            r"MCP server 'tasks' ran 'protocol_error_job' as task \S+, which failed: "
            r"protocol_error_job broke, as it always does \(MCP error -32603\)\.",
            failed.value.message,
        )
        assert pool.servers_info()[0].errors == 2


async def test_a_task_asking_for_input_is_cancelled_and_reported(fixture_url: str) -> None:
    async with pool_for(fixture_url) as pool:
        progress = Progress()
        with pytest.raises(ToolError) as asked:
            await pool.call_tool("tasks", "confirm_delete", {"filename": "a.txt"}, progress_callback=progress)
        task_id = progress.task_id()
        assert asked.value.message == (
            f"MCP server 'tasks' ran 'confirm_delete' as task {task_id}, which asked for input opspawn "
            "cannot give a downstream task, so it was cancelled."
        )
        assert await task_status(fixture_url, task_id) == "cancelled"


async def test_abandoning_the_call_cancels_the_downstream_task(fixture_url: str) -> None:
    async with pool_for(fixture_url) as pool:
        progress = Progress()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(pool.call_tool, progress_callback=progress),
                "tasks",
                "slow_compute",
                {"seconds": 60, "label": "left"},
            )
            await wait_until(lambda: bool(progress.messages), "the pool polls the task")
            tg.cancel_scope.cancel()  # as a cancelled opspawn task cancels its agent's tool call
        # The pool sent tasks/cancel before the cancelled call returned: the fixture says so.
        assert await task_status(fixture_url, progress.task_id()) == "cancelled"


async def test_a_task_past_task_timeout_s_is_cancelled_and_reported(fixture_url: str) -> None:
    async with pool_for(fixture_url, task_timeout_s=1.0) as pool:
        progress = Progress()
        with pytest.raises(ToolError) as overdue:
            await pool.call_tool(
                "tasks", "slow_compute", {"seconds": 60, "label": "late"}, progress_callback=progress
            )
        task_id = progress.task_id()
        assert overdue.value.message == (
            f"MCP server 'tasks' ran 'slow_compute' as task {task_id}, which did not finish within "
            "task_timeout_s=1s; it was cancelled (tasks/cancel). Raise mcpServers.tasks.task_timeout_s "
            "in the config for longer work."
        )
        assert await task_status(fixture_url, task_id) == "cancelled"
