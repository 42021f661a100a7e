"""opspawn's tasks over MCP on both protocol eras, end to end on a real ``opspawn-mcp serve``.

A Tasks-aware client (2026-07-28, declaring ``io.modelcontextprotocol/tasks``) gets a task from
``submit_task`` and follows it with ``tasks/get`` to the agent's answer, cancels another with
``tasks/cancel``, and answers an approval the agent asks for through ``inputRequests`` and
``tasks/update``. A 2025-11-25 client without the extension gets the same tasks synchronously
(``submit_task`` with ``wait``), cancels with ``cancel_task``, keeps its task running when it
disconnects mid-wait, and receives log notifications at the level it set. The LLM is the
scripted fake OpenAI server: "echo X" calls ``testing__echo`` and answers "done: X".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.types import EmptyResult, LoggingLevel, LoggingMessageNotificationParams

from opspawn_mcp.mcp_tasks import (
    TASKS_EXTENSION,
    CancelTaskRequest,
    CreateTaskResult,
    UpdateTaskRequest,
)
from opspawn_mcp.mcp_tasks.wire import TaskIdParams, UpdateTaskParams
from tests.support.fake_openai import spawn_fake_openai
from tests.support.serve import ServerProcess, write_config
from tests.support.tasks_client import POLLS, TERMINAL, TasksAware, follow


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with spawn_fake_openai() as llm_url:
        config = write_config(tmp_path_factory.mktemp("tasks") / "opspawn.json", llm_url)
        document = json.loads(config.read_text())
        guarded = {**document["mcpServers"]["testing"], "require_approval": ["echo"]}
        document["mcpServers"]["guarded"] = guarded  # the testing server again, its echo needs approval
        config.write_text(json.dumps(document))
        server = ServerProcess(config)
        try:
            yield server
        finally:
            code = server.stop()
            assert code == 0, server.log.read_text()
            assert "Traceback" not in server.log.read_text()


def tasks_client(serve: ServerProcess) -> Client:
    return Client(serve.url, extensions=[TasksAware()])


async def submit(client: Client, goal: str, server: str = "testing") -> CreateTaskResult:
    created = await client.session.call_tool(
        "submit_task", {"goal": goal, "servers": [server]}, allow_claimed=True
    )
    assert isinstance(created, CreateTaskResult), created
    return created


async def test_a_tasks_client_follows_submit_task_to_the_agents_answer(serve: ServerProcess) -> None:
    async with tasks_client(serve) as client:
        assert client.session.server_capabilities is not None
        created = await submit(client, "echo hello tasks")
        assert created.status == "working" and created.poll_interval_ms
        done = await follow(client.session, created.task_id, TERMINAL)
        assert done.status == "completed", done
        assert done.result is not None and done.result["content"][0]["text"] == "done: hello tasks"
        assert done.result["structuredContent"]["task_id"] == created.task_id
        # The MCP task id is opspawn's task id: get_status knows it.
        status = await client.call_tool("get_status", {"task_id": created.task_id})
        assert status.structured_content is not None and status.structured_content["status"] == "completed"
        # Without allow_claimed the claim's resolver follows the task for the caller.
        resolved = await client.call_tool("submit_task", {"goal": "echo once more", "servers": ["testing"]})
        assert not resolved.is_error and getattr(resolved.content[0], "text", None) == "done: once more"


async def test_a_tasks_client_cancels_a_task(serve: ServerProcess) -> None:
    async with tasks_client(serve) as client:
        created = await submit(client, "sleep 60")
        await follow(client.session, created.task_id, frozenset({"working"}))
        ack = await client.session.send_request(
            CancelTaskRequest(params=TaskIdParams(task_id=created.task_id)), EmptyResult
        )
        assert set(ack.model_dump(exclude_none=True)) <= {"meta", "result_type"}  # an empty ack
        cancelled = await follow(client.session, created.task_id, TERMINAL)
        assert cancelled.status == "cancelled" and cancelled.result is None
        # Cancelling a finished task is the same empty ack.
        await client.session.send_request(
            CancelTaskRequest(params=TaskIdParams(task_id=created.task_id)), EmptyResult
        )


async def test_a_tasks_client_answers_an_approval_through_input_requests(serve: ServerProcess) -> None:
    async with tasks_client(serve) as client:
        created = await submit(client, "echo approved", server="guarded")
        waiting = await follow(client.session, created.task_id, TERMINAL | {"input_required"})
        assert waiting.status == "input_required", waiting
        assert waiting.input_requests is not None and len(waiting.input_requests) == 1
        [(request_id, request)] = waiting.input_requests.items()
        assert request["method"] == "elicitation/create"
        assert "echo" in request["params"]["message"]
        assert set(request["params"]["requestedSchema"]["properties"]) == {"approve", "note"}
        answer = {request_id: {"action": "accept", "content": {"approve": True, "note": "fine"}}}
        await client.session.send_request(
            UpdateTaskRequest(params=UpdateTaskParams(task_id=created.task_id, input_responses=answer)),
            EmptyResult,
        )
        done = await follow(client.session, created.task_id, TERMINAL)
        assert done.status == "completed", done
        assert done.result is not None and done.result["content"][0]["text"] == "done: approved"


async def test_a_task_outlives_the_server_that_made_it(tmp_path: Path) -> None:
    """The MCP task id is opspawn's: a new ``serve`` on the same store answers tasks/get for it."""
    with spawn_fake_openai() as llm_url:
        config = write_config(tmp_path / "opspawn.json", llm_url)
        first = ServerProcess(config)
        try:
            async with tasks_client(first) as client:
                created = await submit(client, "echo still here")
                await follow(client.session, created.task_id, TERMINAL)
        finally:
            assert first.stop() == 0, first.log.read_text()
        second = ServerProcess(config)
        try:
            async with tasks_client(second) as client:
                done = await follow(client.session, created.task_id, TERMINAL)
        finally:
            assert second.stop() == 0, second.log.read_text()
    assert done.status == "completed" and done.result is not None
    assert done.result["content"][0]["text"] == "done: still here"


# -- 2025-11-25, without the extension --------------------------------------------------------


async def test_a_legacy_client_gets_the_answer_synchronously_and_cancels(serve: ServerProcess) -> None:
    async with Client(serve.url, mode="legacy") as client:
        done = await client.call_tool(
            "submit_task", {"goal": "echo hello legacy", "servers": ["testing"], "wait": 40}
        )
        assert done.structured_content is not None, done
        assert done.structured_content["status"] == "completed"
        assert done.structured_content["result"] == "done: hello legacy"
        running = await client.call_tool("submit_task", {"goal": "sleep 60", "servers": ["testing"]})
        assert running.structured_content is not None
        cancelled = await client.call_tool("cancel_task", {"task_id": running.structured_content["task_id"]})
        assert (
            cancelled.structured_content is not None and cancelled.structured_content["status"] == "cancelled"
        )


async def _status_when_done(client: Client, task_id: str) -> dict[str, Any]:
    """How a legacy client follows a task: ``get_status`` until it says done (bounded by POLLS)."""
    for _ in range(POLLS):
        status = (await client.call_tool("get_status", {"task_id": task_id})).structured_content
        assert status is not None
        if status["done"]:
            return status
        await anyio.sleep(0.1)
    raise AssertionError(f"task {task_id} was not done after {POLLS} polls: {status}")


async def test_a_legacy_client_is_told_of_an_approval_at_once_and_answers_it(serve: ServerProcess) -> None:
    async with Client(serve.url, mode="legacy") as client:
        arguments = {"goal": "echo legacy approved", "servers": ["guarded"], "wait": 40}
        paused = await client.call_tool("submit_task", arguments)
        view = paused.structured_content
        assert view is not None and view["status"] == "input_required", view  # the wait ends at the pause
        answer = {"task_id": view["task_id"], "request_id": view["approval"]["id"], "approve": True}
        assert not (await client.call_tool("approve_task", answer)).is_error
        assert (await _status_when_done(client, view["task_id"]))["result"] == "done: legacy approved"


async def test_a_legacy_client_never_sees_a_task_result_shape(serve: ServerProcess) -> None:
    async with Client(serve.url, mode="legacy", extensions=[TasksAware()]) as client:
        result = await client.call_tool("submit_task", {"goal": "echo no task here", "servers": ["testing"]})
        assert result.structured_content is not None and result.structured_content["task_id"]


async def test_a_client_that_disconnects_mid_wait_leaves_its_task_running(serve: ServerProcess) -> None:
    progressed = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progressed.set()

    async def submit_and_wait() -> None:
        async with Client(serve.url, mode="legacy") as client:
            await client.call_tool(
                "submit_task",
                {"goal": "sleep 2", "servers": ["testing"], "wait": 40},
                progress_callback=on_progress,
            )

    async with anyio.create_task_group() as group:
        group.start_soon(submit_and_wait)
        await progressed.wait()
        group.cancel_scope.cancel()  # the client goes away with its call still waiting

    async with Client(serve.url, mode="legacy") as client:
        page = await client.call_tool("list_tasks", {"limit": 20})
        assert page.structured_content is not None
        [task] = [t for t in page.structured_content["tasks"] if t["goal"] == "sleep 2"]
        status = await _status_when_done(client, task["task_id"])
        assert status["status"] == "completed", status


@pytest.mark.filterwarnings("ignore:The logging capability is deprecated")  # it is, from 2026-07-28 on
@pytest.mark.parametrize(("level", "expect"), [("debug", {"debug", "info"}), ("warning", set())])
async def test_log_notifications_honour_logging_set_level(
    serve: ServerProcess, level: LoggingLevel, expect: set[str]
) -> None:
    seen: list[LoggingMessageNotificationParams] = []

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        seen.append(params)

    async with Client(serve.url, mode="legacy", logging_callback=on_log) as client:
        await client.set_logging_level(level)
        done = await client.call_tool(
            "submit_task", {"goal": f"echo log {level}", "servers": ["testing"], "wait": 40}
        )
        assert done.structured_content is not None and done.structured_content["status"] == "completed"
    assert {p.level for p in seen} == expect
    assert all(p.logger == "opspawn" for p in seen)


async def listen(url: str, notifications: dict[str, Any], *, declare: bool = True) -> list[dict[str, Any]]:
    """One raw ``subscriptions/listen`` over streamable HTTP (the SDK client's listen has no
    ``taskIds``): every JSON-RPC message of its stream, up to its result or error."""
    extensions = {TASKS_EXTENSION: {}} if declare else {}
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"extensions": extensions},
    }
    body = {
        "jsonrpc": "2.0",
        "id": "listen-1",
        "method": "subscriptions/listen",
        "params": {"notifications": notifications, "_meta": meta},
    }
    headers = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "subscriptions/listen",
    }
    messages: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", url, json=body, headers=headers) as response,
    ):
        if response.headers["content-type"].startswith("application/json"):  # refused before any stream
            return [json.loads(await response.aread())]
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line.removeprefix("data:")))
                if "result" in messages[-1] or "error" in messages[-1]:
                    break
    return messages


async def test_a_tasks_client_hears_its_task_change_over_subscriptions_listen(serve: ServerProcess) -> None:
    async with tasks_client(serve) as client:
        created = await submit(client, "echo heard")
    messages = await listen(serve.url, {"taskIds": [created.task_id, "no-such-task"]})
    ack, *frames, end = messages
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    assert ack["params"]["notifications"] == {"taskIds": [created.task_id]}
    assert frames and all(f["method"] == "notifications/tasks" for f in frames)
    assert all(f["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-1" for f in frames)
    last = frames[-1]["params"]
    assert last["taskId"] == created.task_id and last["status"] == "completed"
    assert last["result"]["content"][0]["text"] == "done: heard"
    assert "result" in end  # every task it followed ended: the stream closes gracefully


async def test_listening_for_tasks_needs_the_extension(serve: ServerProcess) -> None:
    [answer] = await listen(serve.url, {"taskIds": ["any"]}, declare=False)
    assert answer["error"]["code"] == -32021
