"""Each door's mapping of approvals: the task view shows the pending request, the answer call
reaches TaskService.answer, and its errors come back typed (tool error, problem+json, status code).

The rules are the service's (test_service_approvals.py); a task is paused through the real store
as a worker would (``service_kit.pause``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from mcp import Client

from opspawn_mcp.grpc_internal.convert import task_from_pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.models import Task, TaskStatus
from opspawn_mcp.server import build_server
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import pause
from tests.unit.test_gateway import BASE, assert_problem, http_app
from tests.unit.test_grpc import code_of, connected, task_stub


async def paused(service: TaskService, store: MemoryStore) -> Task:
    from opspawn_mcp.principals import LOCAL

    task = await service.submit({"goal": "delete /tmp/x"}, by=LOCAL)
    waiting = await pause(store, task.id)
    assert waiting.approval is not None
    return waiting


def text(result: Any) -> str:
    return "".join(block.text for block in result.content)


# -- MCP ------------------------------------------------------------------------------------


async def test_mcp_get_status_shows_the_request_and_approve_task_answers_it(
    service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    assert task.approval is not None
    async with Client(build_server(service)) as client:
        status = (await client.call_tool("get_status", {"task_id": task.id})).structured_content
        assert status is not None
        assert status["status"] == "input_required" and status["done"] is False
        assert status["approval"]["id"] == task.approval.id
        assert status["approval"]["tool"] == "delete" and status["approval"]["arguments"] == {
            "path": "/tmp/x"
        }
        assert "approve_task" in status["next"] and task.approval.id in status["next"]

        answered = await client.call_tool(
            "approve_task",
            {"task_id": task.id, "request_id": task.approval.id, "approve": False, "note": "no"},
        )
        assert not answered.is_error, text(answered)
        assert answered.structured_content is not None
        assert answered.structured_content["status"] == "queued"
        assert answered.structured_content["approval"] is None

        again = await client.call_tool(
            "approve_task", {"task_id": task.id, "request_id": task.approval.id, "approve": True}
        )
        assert again.is_error and "conflict: " in text(again) and "waits for no answer" in text(again)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"request_id": "r", "approve": True}, "invalid_input: task_id must be a string"),
        ({"task_id": "t"}, "invalid_input: request_id is missing or empty"),
        ({"task_id": "t", "request_id": "r"}, "invalid_input: Invalid answer: approve: Field required"),
        ({"task_id": "nope", "request_id": "r", "approve": True}, "not_found: No task with id 'nope'"),
        ({"task_id": "nope", "request_id": "r", "approve": "yes"}, "invalid_input: Invalid answer: approve"),
    ],
)
async def test_mcp_approve_task_argument_errors_come_from_the_service(
    service: TaskService, args: dict[str, Any], message: str
) -> None:
    async with Client(build_server(service)) as client:
        result = await client.call_tool("approve_task", args)
        assert result.is_error and message in text(result)


# -- REST -----------------------------------------------------------------------------------


@pytest.fixture
async def rest(service: TaskService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=http_app(service)), base_url=BASE) as c:
        yield c


async def test_rest_shows_the_request_and_post_input_answers_it(
    rest: httpx.AsyncClient, service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    assert task.approval is not None
    shown = (await rest.get(f"/v1/tasks/{task.id}")).json()
    assert shown["status"] == "input_required" and shown["approval"]["id"] == task.approval.id
    assert "tool_call" not in shown["approval"]
    listed = (await rest.get("/v1/tasks", params={"status": "input_required"})).json()
    assert [t["task_id"] for t in listed["items"]] == [task.id]

    r = await rest.post(f"/v1/tasks/{task.id}/input", json={"request_id": task.approval.id, "approve": True})

    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and r.json()["approval"] is None


async def test_rest_input_errors_are_problems(
    rest: httpx.AsyncClient, service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    assert task.approval is not None
    url = f"/v1/tasks/{task.id}/input"

    wrong = assert_problem(await rest.post(url, json={"request_id": "old", "approve": True}), 409, "conflict")
    assert wrong["pending_request_id"] == task.approval.id
    assert_problem(
        await rest.post(url, content=b"{", headers={"content-type": "application/json"}),
        400,
        "malformed_json",
    )
    assert_problem(await rest.post(url, json=["approve"]), 422, "invalid_input")
    note = assert_problem(
        await rest.post(url, json={"request_id": task.approval.id, "approve": True, "note": "x" * 2001}),
        422,
        "invalid_input",
    )
    assert any(p.startswith("note:") for p in note["problems"])
    assert_problem(await rest.post(url, json={"approve": True}), 422, "invalid_input")
    assert_problem(
        await rest.post("/v1/tasks/nope/input", json={"request_id": "r", "approve": True}), 404, "not_found"
    )
    assert (await store.get(task.id)).status is TaskStatus.INPUT_REQUIRED


async def test_the_openapi_document_describes_the_input_route(rest: httpx.AsyncClient) -> None:
    doc = (await rest.get("/openapi.json")).json()
    post = doc["paths"]["/v1/tasks/{task_id}/input"]["post"]
    assert post["operationId"] == "answerTask"
    assert {"200", "404", "409", "422"} <= set(post["responses"])
    body = doc["components"]["schemas"]["ApprovalInput"]
    assert set(body["properties"]) == {"request_id", "approve", "note"}
    assert set(body["required"]) == {"request_id", "approve"}
    assert "input_required" in doc["components"]["schemas"]["TaskStatus"]["enum"]


# -- gRPC -----------------------------------------------------------------------------------


async def test_grpc_task_shows_the_request_and_answer_task_answers_it(
    service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    assert task.approval is not None
    async with connected(service) as channel:
        stub = task_stub(channel)
        shown = await stub.GetTask(pb.GetTaskRequest(task_id=task.id))
        assert shown.status == pb.TASK_STATUS_INPUT_REQUIRED
        assert task_from_pb(shown).approval == task.approval.model_copy(update={"tool_call": 0, "step": 0})
        listed = await stub.ListTasks(pb.ListTasksRequest(status=pb.TASK_STATUS_INPUT_REQUIRED))
        assert [t.id for t in listed.items] == [task.id]

        unset = stub.AnswerTask(pb.AnswerTaskRequest(task_id=task.id, request_id=task.approval.id))
        code, details = await code_of(unset)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "approve" in details
        wrong = stub.AnswerTask(pb.AnswerTaskRequest(task_id=task.id, request_id="old", approve=True))
        code, details = await code_of(wrong)
        assert code is grpc.StatusCode.FAILED_PRECONDITION and task.approval.id in details

        answered = await stub.AnswerTask(
            pb.AnswerTaskRequest(task_id=task.id, request_id=task.approval.id, approve=False, note="no")
        )
        assert answered.status == pb.TASK_STATUS_QUEUED and not answered.HasField("approval")
        missing = stub.AnswerTask(pb.AnswerTaskRequest(task_id="nope", request_id="r", approve=True))
        assert (await code_of(missing))[0] is grpc.StatusCode.NOT_FOUND
