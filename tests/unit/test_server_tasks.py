"""submit_task as an MCP task: the status mapping of ``opspawn_mcp.server_tasks`` through the
SDK's in-memory client (2026-07-28, declaring the tasks extension) over a real TaskService.

No worker runs: each test moves the task through the store the way a worker would, then reads
it with ``tasks/get``.
"""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client
from mcp.server import MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import EmptyResult

from opspawn_mcp.mcp_tasks import CancelTaskRequest, CreateTaskResult, DetailedTask, GetTaskRequest
from opspawn_mcp.mcp_tasks.wire import TaskIdParams
from opspawn_mcp.models import TaskStatus
from opspawn_mcp.recovery import gave_up_reason
from opspawn_mcp.server import build_server
from opspawn_mcp.server_tasks import approval_answer
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.tasks_client import TasksAware


@pytest.fixture
def server(service: TaskService) -> MCPServer:
    return build_server(service)


async def get(client: Client, task_id: str) -> DetailedTask:
    return await client.session.send_request(
        GetTaskRequest(params=TaskIdParams(task_id=task_id)), DetailedTask
    )


async def create(client: Client, **arguments: Any) -> CreateTaskResult:
    created = await client.session.call_tool(
        "submit_task", {"goal": "echo hi", **arguments}, allow_claimed=True
    )
    assert isinstance(created, CreateTaskResult), created
    return created


async def test_a_declaring_client_gets_opspawns_task_id_as_a_working_task(
    server: MCPServer, store: MemoryStore
) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        created = await create(client, servers=["echo"])
        assert created.status == "working" and created.ttl_ms is None and created.poll_interval_ms == 1000
        assert (await store.get(created.task_id)).status is TaskStatus.QUEUED
        working = await get(client, created.task_id)
        assert working.status == "working" and working.result is None and working.error is None


async def test_a_completed_task_inlines_the_agents_answer(server: MCPServer, store: MemoryStore) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        created = await create(client)
        await store.transition(created.task_id, {TaskStatus.QUEUED}, TaskStatus.RUNNING)
        await store.transition(
            created.task_id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="the answer"
        )
        done = await get(client, created.task_id)
        assert done.status == "completed" and done.result is not None
        assert done.result["content"] == [{"type": "text", "text": "the answer"}]
        assert done.result["structuredContent"]["status"] == "completed"


async def test_an_agent_failure_is_a_completed_tool_error(server: MCPServer, store: MemoryStore) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        created = await create(client)
        await store.transition(
            created.task_id, {TaskStatus.QUEUED}, TaskStatus.FAILED, error="the agent failed: no luck"
        )
        done = await get(client, created.task_id)
        assert done.status == "completed" and done.error is None and done.result is not None
        assert (
            done.result["isError"] is True
            and done.result["content"][0]["text"] == "the agent failed: no luck"
        )


async def test_an_infrastructure_failure_is_a_failed_task_with_a_jsonrpc_error(
    server: MCPServer, store: MemoryStore
) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        created = await create(client)
        reason = gave_up_reason(3, None)
        await store.transition(created.task_id, {TaskStatus.QUEUED}, TaskStatus.FAILED, error=reason)
        failed = await get(client, created.task_id)
        assert failed.status == "failed" and failed.result is None
        assert failed.error == {"code": -32603, "message": reason}


async def test_cancel_is_an_empty_ack_also_for_a_finished_task(server: MCPServer, store: MemoryStore) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        created = await create(client)
        request = CancelTaskRequest(params=TaskIdParams(task_id=created.task_id))
        await client.session.send_request(request, EmptyResult)
        assert (await get(client, created.task_id)).status == "cancelled"
        await client.session.send_request(request, EmptyResult)


async def test_a_bad_submit_is_a_tool_error_and_no_task(server: MCPServer) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        refused = await client.session.call_tool(
            "submit_task", {"goal": "x", "servers": ["nope"]}, allow_claimed=True
        )
        assert not isinstance(refused, CreateTaskResult) and refused.is_error
        assert "Unknown server(s) 'nope'" in refused.content[0].text  # type: ignore[union-attr]


async def test_an_unknown_task_id_is_invalid_params(server: MCPServer) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        with pytest.raises(MCPError) as raised:
            await get(client, "no-such-task")
        assert raised.value.code == -32602


async def test_a_client_without_the_extension_gets_the_status_and_no_tasks_methods(server: MCPServer) -> None:
    async with Client(server) as client:
        status = await client.call_tool("submit_task", {"goal": "echo hi"})
        assert status.structured_content is not None and status.structured_content["status"] == "queued"
        with pytest.raises(MCPError) as raised:
            await get(client, status.structured_content["task_id"])
        assert raised.value.code == -32021


@pytest.mark.parametrize(
    ("response", "approve", "note"),
    [
        ({"action": "accept", "content": {"approve": True}}, True, None),
        ({"action": "accept", "content": {"approve": False, "note": "no"}}, False, "no"),
        ({"action": "decline"}, False, "the client answered decline"),
        ({"action": "cancel", "content": {"approve": True}}, False, "the client answered cancel"),
    ],
)
def test_an_elicitation_answer_approves_only_when_accepted_with_approve_true(
    response: dict[str, Any], approve: bool, note: str | None
) -> None:
    answer = approval_answer(response)
    assert (answer.approve, answer.note) == (approve, note)


@pytest.mark.parametrize(
    "response", [{"approve": True}, "yes", {"action": "accept", "content": {"note": "x" * 5000}}]
)
def test_a_malformed_approval_answer_is_invalid_params(response: Any) -> None:
    with pytest.raises(MCPError) as raised:
        approval_answer(response)
    assert raised.value.code == -32602


async def test_a_working_tasks_status_names_its_newest_event(server: MCPServer, store: MemoryStore) -> None:
    async with Client(server, extensions=[TasksAware()]) as client:
        created = await create(client, servers=["echo"])
        assert (
            await get(client, created.task_id)
        ).status_message == "queued, 0 step(s) taken; last event: state"
        await store.claim(created.task_id, "w1", 30.0, 3)
        await store.append_event(created.task_id, "tool_call", {"name": "echo__echo", "arguments": {}})
        seen = await get(client, created.task_id)
        assert seen.status_message == "running, 0 step(s) taken; last event: tool_call echo__echo"
        await store.append_event(created.task_id, "progress", {"tool": "echo__echo", "message": "half"})
        later = await get(client, created.task_id)  # read from the seq the last poll reached
        assert later.status_message == "running, 0 step(s) taken; last event: progress echo__echo half"
        assert (await get(client, created.task_id)).status_message == later.status_message
