"""The MCP door's mapping: tools and resources over a real TaskService, through an in-memory Client.

The rules themselves are tested in test_service.py; here we check that each tool passes its
arguments through, shapes the answer, and turns a typed error into ``isError`` with its message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from mcp import Client
from mcp.server import MCPServer

from opspawn_mcp.models import TaskStatus
from opspawn_mcp.server import build_server
from opspawn_mcp.server_tasks import SUBMIT_ARGUMENTS
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.mcp_wire import OPSPAWN_TOOLS
from tests.support.service_kit import WARNING, RecordingEnqueuer, finish


@pytest.fixture
def server(service: TaskService) -> MCPServer:
    """A fresh MCP server per test; each test opens its own Client, because anyio's cancel
    scopes must be entered and left in the same task (a yield fixture would split them)."""
    return build_server(service)


def text(result: Any) -> str:
    return "".join(block.text for block in result.content)


async def test_tools_have_descriptions_and_schemas(server: MCPServer) -> None:
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == OPSPAWN_TOOLS
        for tool in tools.values():
            assert tool.description and tool.output_schema
        submit = tools["submit_task"].input_schema
        assert submit["required"] == ["goal"]
        assert submit["properties"]["goal"]["maxLength"] == 20_000
        assert submit["properties"]["max_steps"]["maximum"] == 100
        assert set(submit["properties"]) >= {"servers", "model", "max_steps", "planner", "timeout_s", "wait"}
        # The arguments it lists are the ones it takes: TaskSpec's fields (but chain) and wait.
        assert set(submit["properties"]) == SUBMIT_ARGUMENTS
        assert tools["get_status"].annotations is not None and tools["get_status"].annotations.read_only_hint
        assert "submit_task" in (client.instructions or "")


async def test_submit_returns_the_queued_task_at_once(server: MCPServer, enqueuer: RecordingEnqueuer) -> None:
    async with Client(server) as client:
        result = await client.call_tool(
            "submit_task", {"goal": "echo hi", "servers": ["echo"], "max_steps": 3, "timeout_s": 60}
        )
        assert not result.is_error
        view = result.structured_content
        assert view is not None
        assert view["status"] == "queued" and view["done"] is False
        assert view["progress"] == {"steps": 0, "max_steps": 3}
        assert enqueuer.ids == [view["task_id"]]
        assert view["task_id"] in view["next"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"goal": "x", "servers": ["evil"]}, "forbidden: Unknown server(s) 'evil'"),
        ({"goal": ""}, "invalid_input"),
        ({"goal": "x" * 20_001}, "payload_too_large"),
        ({"goal": "x", "max_steps": 0}, "max_steps"),
        ({"goal": "x", "wait": -1}, "wait must be"),
        ({"goal": 5}, "invalid_input: Invalid task spec: goal: Input should be a valid string"),
        ({"goal": "x", "planner": "yolo"}, "invalid_input: Invalid task spec: planner"),
        ({"goal": "x", "max_steps": "many"}, "invalid_input: Invalid task spec: max_steps"),
        ({"goal": "x", "servers": "testing"}, "invalid_input: Invalid task spec: servers"),
        ({"goal": "x", "model": {"temperature": 9}}, "invalid_input: Invalid task spec: model.temperature"),
        ({"goal": "x", "wait": "soon"}, "invalid_input: wait must be"),
        ({"goal": "x", "model": {"base_url": "http://127.0.0.1:9/v1"}}, "model.base_url cannot be set"),
        ({"goal": "x", "model": {"profile": "nope"}}, "forbidden: Unknown model profile 'nope'"),
        ({"goal": "x", "colour": "red"}, "invalid_input: submit_task has no argument(s) 'colour'"),
        ({"servers": ["testing"]}, "invalid_input: The goal is empty; say what the agent must do."),
    ],
)
async def test_bad_input_is_a_tool_error_with_a_clear_message(
    server: MCPServer, enqueuer: RecordingEnqueuer, args: dict[str, Any], message: str
) -> None:
    async with Client(server) as client:
        result = await client.call_tool("submit_task", args)
        assert result.is_error
        assert message in text(result)
        assert enqueuer.ids == []


async def test_get_status_list_and_cancel(server: MCPServer) -> None:
    async with Client(server) as client:
        first = (await client.call_tool("submit_task", {"goal": "a"})).structured_content
        second = (await client.call_tool("submit_task", {"goal": "b"})).structured_content
        assert first and second
        status = await client.call_tool("get_status", {"task_id": first["task_id"]})
        assert status.structured_content and status.structured_content["goal"] == "a"

        cancelled = await client.call_tool("cancel_task", {"task_id": first["task_id"]})
        assert cancelled.structured_content
        assert cancelled.structured_content["status"] == "cancelled"
        assert cancelled.structured_content["done"] is True

        page = (await client.call_tool("list_tasks", {"limit": 1})).structured_content
        assert page and [t["task_id"] for t in page["tasks"]] == [second["task_id"]]
        rest = (
            await client.call_tool("list_tasks", {"limit": 1, "cursor": page["next_cursor"]})
        ).structured_content
        assert rest and [t["task_id"] for t in rest["tasks"]] == [first["task_id"]]
        only = (await client.call_tool("list_tasks", {"status": "cancelled"})).structured_content
        assert only and [t["task_id"] for t in only["tasks"]] == [first["task_id"]]
        found = (await client.call_tool("list_tasks", {"goal_contains": "B"})).structured_content
        assert found and [t["task_id"] for t in found["tasks"]] == [second["task_id"]]
        too_long = await client.call_tool("list_tasks", {"goal_contains": "x" * 300})
        assert too_long.is_error and "invalid_input: The search text must be at most 200" in text(too_long)


async def test_a_completed_task_with_a_warning_says_to_read_it_first(
    server: MCPServer, store: MemoryStore
) -> None:
    async with Client(server) as client:
        submitted = (await client.call_tool("submit_task", {"goal": "a"})).structured_content
        assert submitted and submitted["warning"] is None
        await finish(store, submitted["task_id"], "done: disk full", warning=WARNING)
        shown = (await client.call_tool("get_status", {"task_id": submitted["task_id"]})).structured_content
        assert shown and (shown["status"], shown["warning"]) == ("completed", WARNING)
        assert shown["next"] == "Done, with a warning: read `warning` before you rely on `result`."
        listed = (await client.call_tool("list_tasks", {})).structured_content
        assert listed and listed["tasks"][0]["warning"] == WARNING


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("list_tasks", {"status": "done"}, "invalid_input: Unknown status 'done'"),
        ("list_tasks", {"limit": "x"}, "invalid_input: limit must be"),
        ("list_tasks", {"limit": 0}, "invalid_input: limit must be"),
        ("list_tasks", {"cursor": 5}, "invalid_input: cursor must be"),
        ("get_status", {"task_id": 5}, "invalid_input: task_id must be a string"),
        ("cancel_task", {"task_id": ""}, "invalid_input: task_id is empty"),
    ],
)
async def test_every_argument_error_comes_from_the_service(
    server: MCPServer, tool: str, args: dict[str, Any], message: str
) -> None:
    async with Client(server) as client:
        result = await client.call_tool(tool, args)
        assert result.is_error
        assert message in text(result)


async def test_unknown_ids_and_conflicts_are_tool_errors(server: MCPServer, store: MemoryStore) -> None:
    async with Client(server) as client:
        missing = await client.call_tool("get_status", {"task_id": "nope"})
        assert missing.is_error and "not_found: No task with id 'nope'" in text(missing)
        task = (await client.call_tool("submit_task", {"goal": "a"})).structured_content
        assert task
        await store.claim(task["task_id"], "w", 30.0, 3)
        await store.transition(task["task_id"], {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="ok")
        conflict = await client.call_tool("cancel_task", {"task_id": task["task_id"]})
        assert conflict.is_error and "conflict: " in text(conflict)


async def test_list_servers(server: MCPServer) -> None:
    async with Client(server) as client:
        result = (await client.call_tool("list_servers", {})).structured_content
        assert result and [s["name"] for s in result["servers"]] == ["echo", "files"]
        assert result["servers"][0]["tools"] == ["echo"]


async def _worker(store: MemoryStore, enqueuer: RecordingEnqueuer) -> None:
    """Plays the worker on the real store once the task is enqueued."""
    await enqueuer.enqueued.wait()
    task_id = enqueuer.ids[0]
    await store.claim(task_id, "w", 30.0, 3)
    await store.append_event(task_id, "state", {"status": "running"})
    await store.append_event(task_id, "tool_call", {"tool": "echo__echo", "arguments": {"text": "hi"}})
    await store.append_event(task_id, "final", {"result": "done: hi"})
    await store.transition(task_id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="done: hi")


async def test_submit_with_wait_reports_progress_and_returns_the_result(
    server: MCPServer, store: MemoryStore, enqueuer: RecordingEnqueuer
) -> None:
    async with Client(server) as client:
        progress: list[tuple[float, str | None]] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, message))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(_worker(store, enqueuer))
            result = await client.call_tool(
                "submit_task", {"goal": "echo hi", "wait": 60}, progress_callback=on_progress
            )
        view = result.structured_content
        assert view and view["status"] == "completed" and view["result"] == "done: hi"
        values = [v for v, _ in progress]
        assert values == sorted(values) and len(values) >= 3
        assert any(m and m.startswith("tool_call") for _, m in progress)


async def test_resources(server: MCPServer, store: MemoryStore) -> None:
    async with Client(server) as client:
        task = (await client.call_tool("submit_task", {"goal": "a"})).structured_content
        assert task
        body = await client.read_resource(f"opspawn://tasks/{task['task_id']}")
        doc = json.loads(body.contents[0].text)  # type: ignore[union-attr]
        assert doc["task_id"] == task["task_id"] and doc["spec"]["goal"] == "a"
        assert "lease_owner" not in doc
        events = await client.read_resource(f"opspawn://tasks/{task['task_id']}/events")
        log = json.loads(events.contents[0].text)  # type: ignore[union-attr]
        assert [e["kind"] for e in log] == ["state"]
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert templates == {"opspawn://tasks/{task_id}", "opspawn://tasks/{task_id}/events"}
        with pytest.raises(Exception, match="No task with id"):
            await client.read_resource("opspawn://tasks/nope")
