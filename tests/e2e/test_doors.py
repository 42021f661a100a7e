"""The three front doors agree: the same task scenarios through MCP, REST and gRPC against one
real ``opspawn-mcp serve`` process (uvicorn + grpc.aio on free ports, embedded worker, SQLite
store, the bundled example MCP server, and the fake OpenAI-compatible LLM in its own process).

Each scenario states its expectation once (a final status and result, or an error class from
``opspawn_mcp.errors``), and each door is checked against it through its own mapping: MCP's
``<kind>: <message>`` tool errors, REST's problem ``status``/``kind``, gRPC's status code.

Waits follow event streams or poll with a hang guard only; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx
import pytest

from opspawn_mcp.errors import Conflict, InvalidInput, OpspawnError, TaskNotFound, Unauthenticated
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc
from tests.security.kit import Serve, mcp_call, mcp_read, rest, run_serve
from tests.servers.harness import HANG_GUARD_S
from tests.support.fake_openai import spawn_fake_openai
from tests.support.serve import fake_llm_profile

TOKEN = "doors-e2e-token"
TOKEN_ENV = "OPSPAWN_DOORS_TOKEN"


# -- the server process -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with spawn_fake_openai() as llm_url:
        opspawn = {"llm": fake_llm_profile(llm_url), "server": {"auth_token_env": TOKEN_ENV}}
        with run_serve(tmp_path_factory.mktemp("doors"), opspawn, env={TOKEN_ENV: TOKEN}) as serve:
            yield serve


# -- the doors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What every door must agree on about a task."""

    task_id: str
    status: str
    result: str | None


class DoorError(Exception):
    """A refusal as one door reports it; ``means`` checks it through that door's own mapping."""

    def __init__(self, door: str, code: Any, kind: str | None, message: str) -> None:
        super().__init__(f"{door}: {code} {kind} {message}")
        self.door, self.code, self.kind, self.message = door, code, kind, message

    def means(self, error: type[OpspawnError]) -> bool:
        if self.door == "mcp":
            return self.kind == error.kind
        if self.door == "rest":
            return bool(self.code == error.status and (self.kind == error.kind or error is Unauthenticated))
        return bool(self.code == grpc.StatusCode[error.grpc_code])


class Door(Protocol):
    async def run(self, spec: dict[str, Any]) -> Outcome:
        """Submit and follow the task until it ends; the final task. (MCP's door waits instead.)"""
        task = await self.submit(spec)
        await self.follow(task.task_id)
        return await self.get(task.task_id)

    async def submit(self, spec: dict[str, Any]) -> Outcome: ...

    async def get(self, task_id: str) -> Outcome: ...

    async def cancel(self, task_id: str) -> Outcome: ...

    async def follow(self, task_id: str) -> list[str]:
        """The kinds of the task's events, streamed until it ends."""


class McpDoor:
    """MCP over streamable HTTP; ``submit_task`` with ``wait`` is how an MCP client follows a task."""

    def __init__(self, server: Serve, token: str) -> None:
        self.server = server
        self.token = token

    async def _call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        answer = await mcp_call(self.server, self.token, tool, arguments)
        # The MCP client reports an HTTP refusal as a generic JSON-RPC error; the status is what
        # the transport actually answered.
        if answer.http_status == 401:
            raise DoorError("mcp", 401, Unauthenticated.kind, answer.text)
        assert answer.http_status is None, answer
        if answer.is_error:
            raise DoorError("mcp", None, answer.kind, answer.text.partition(": ")[2])
        assert answer.data is not None
        return answer.data

    @staticmethod
    def _outcome(view: dict[str, Any]) -> Outcome:
        return Outcome(view["task_id"], view["status"], view["result"])

    async def run(self, spec: dict[str, Any]) -> Outcome:
        return self._outcome(await self._call("submit_task", {**spec, "wait": HANG_GUARD_S}))

    async def submit(self, spec: dict[str, Any]) -> Outcome:
        return self._outcome(await self._call("submit_task", spec))

    async def get(self, task_id: str) -> Outcome:
        return self._outcome(await self._call("get_status", {"task_id": task_id}))

    async def cancel(self, task_id: str) -> Outcome:
        return self._outcome(await self._call("cancel_task", {"task_id": task_id}))

    async def follow(self, task_id: str) -> list[str]:
        """MCP has no open-ended watch tool; its event log is the events resource, read at the end."""
        deadline = time.monotonic() + HANG_GUARD_S
        while not (await self._call("get_status", {"task_id": task_id}))["done"]:
            assert time.monotonic() < deadline, "hang guard"
            await asyncio.sleep(0.05)
        read = await mcp_read(self.server, self.token, f"opspawn://tasks/{task_id}/events")
        assert not read.is_error, read.text
        events = json.loads(read.text)
        items = events["events"] if isinstance(events, dict) else events
        return [e["kind"] for e in items]


class RestDoor(Door):
    def __init__(self, server: Serve, token: str) -> None:
        self.client = rest(server, token)

    @staticmethod
    def _check(r: httpx.Response) -> dict[str, Any]:
        body: dict[str, Any] = r.json()
        if r.status_code >= 400:
            raise DoorError(
                "rest", r.status_code, body.get("kind") or body.get("error"), body.get("detail", "")
            )
        return body

    @staticmethod
    def _outcome(task: dict[str, Any]) -> Outcome:
        return Outcome(task["task_id"], task["status"], task["result"])

    async def submit(self, spec: dict[str, Any]) -> Outcome:
        r = await self.client.post("/v1/tasks", json=spec)
        task = self._check(r)
        assert r.status_code == 202
        assert r.headers["location"].endswith(f"/v1/tasks/{task['task_id']}")
        return self._outcome(task)

    async def get(self, task_id: str) -> Outcome:
        return self._outcome(self._check(await self.client.get(f"/v1/tasks/{task_id}")))

    async def cancel(self, task_id: str) -> Outcome:
        return self._outcome(self._check(await self.client.post(f"/v1/tasks/{task_id}/cancel")))

    async def follow(self, task_id: str) -> list[str]:
        kinds = []
        async with self.client.stream("GET", f"/v1/tasks/{task_id}/events") as r:
            if r.status_code >= 400:
                await r.aread()
                self._check(r)
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    kinds.append(line.removeprefix("event: "))
        return kinds


class GrpcDoor(Door):
    def __init__(self, server: Serve, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(server.grpc)
        self.stub = pb_grpc.TaskServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise DoorError("grpc", exc.code(), None, exc.details() or "") from None

    @staticmethod
    def _outcome(task: pb.Task) -> Outcome:
        status = pb.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_").lower()
        return Outcome(task.id, status, task.result if task.HasField("result") else None)

    async def submit(self, spec: dict[str, Any]) -> Outcome:
        return self._outcome(await self._unary("SubmitTask", pb.SubmitTaskRequest(spec=pb.TaskSpec(**spec))))

    async def get(self, task_id: str) -> Outcome:
        return self._outcome(await self._unary("GetTask", pb.GetTaskRequest(task_id=task_id)))

    async def cancel(self, task_id: str) -> Outcome:
        return self._outcome(await self._unary("CancelTask", pb.CancelTaskRequest(task_id=task_id)))

    async def follow(self, task_id: str) -> list[str]:
        kinds = []
        try:
            async for event in self.stub.WatchTask(
                pb.WatchTaskRequest(task_id=task_id), metadata=self.metadata
            ):
                kinds.append(event.kind)
        except grpc.aio.AioRpcError as exc:
            raise DoorError("grpc", exc.code(), None, exc.details() or "") from None
        return kinds


DOORS: dict[str, type[McpDoor | RestDoor | GrpcDoor]] = {"mcp": McpDoor, "rest": RestDoor, "grpc": GrpcDoor}


@asynccontextmanager
async def open_door(name: str, server: Serve, token: str = TOKEN) -> AsyncIterator[Door]:
    door: McpDoor | RestDoor | GrpcDoor = DOORS[name](server, token)
    try:
        yield door
    finally:
        if isinstance(door, RestDoor):
            await door.client.aclose()
        elif isinstance(door, GrpcDoor):
            await door.channel.close()


pytestmark = pytest.mark.parametrize("door_name", list(DOORS))


# -- the scenarios ----------------------------------------------------------------------------


async def test_submit_and_watch_to_completion(server: Serve, door_name: str) -> None:
    async with open_door(door_name, server) as door:
        done = await door.run({"goal": "echo hello doors", "servers": ["example"]})
        assert (done.status, done.result) == ("completed", "done: hello doors")
        kinds = await door.follow(done.task_id)  # a finished task replays its log and ends
        assert kinds[0] == "state"
        assert {"llm", "tool_call", "tool_result", "final"} <= set(kinds)
        assert kinds[-1] == "state"


async def test_cancel_a_task_then_cancelling_a_finished_one_conflicts(server: Serve, door_name: str) -> None:
    async with open_door(door_name, server) as door:
        # The agent calls the example server's 30 s sleep tool, so the cancel always lands first.
        task = await door.submit({"goal": "sleep 30", "servers": ["example"]})
        cancelled = await door.cancel(task.task_id)
        assert cancelled.status == "cancelled"
        await door.follow(task.task_id)  # the stream ends because the task has ended
        assert (await door.get(task.task_id)).status == "cancelled"
        done = await door.run({"goal": "echo x", "servers": ["example"]})
        with pytest.raises(DoorError) as info:
            await door.cancel(done.task_id)
        assert info.value.means(Conflict), info.value


async def test_unknown_task_is_not_found(server: Serve, door_name: str) -> None:
    async with open_door(door_name, server) as door:
        for call in (door.get, door.cancel, door.follow):
            with pytest.raises(DoorError) as info:
                await call("no-such-task")
            assert info.value.means(TaskNotFound), info.value


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"goal": "x", "max_steps": 0}, "max_steps"), ({"goal": "x", "planner": "yolo"}, "planner")],
)
async def test_bad_input_is_invalid_with_the_same_message(
    server: Serve, door_name: str, spec: dict[str, Any], field: str
) -> None:
    async with open_door(door_name, server) as door:
        with pytest.raises(DoorError) as info:
            await door.submit(spec)
        assert info.value.means(InvalidInput), info.value
        assert field in info.value.message


async def test_a_wrong_token_is_unauthenticated(server: Serve, door_name: str) -> None:
    async with open_door(door_name, server, token="wrong") as door:
        with pytest.raises(DoorError) as info:
            await door.get("anything")
        assert info.value.means(Unauthenticated), info.value


async def test_every_door_sees_the_same_task(server: Serve, door_name: str) -> None:
    """A task submitted through one door is the same task, same fields, through the others."""
    async with open_door(door_name, server) as door:
        done = await door.run({"goal": "echo shared", "servers": ["example"]})
    for other in DOORS:
        async with open_door(other, server) as seen:
            assert await seen.get(done.task_id) == done
