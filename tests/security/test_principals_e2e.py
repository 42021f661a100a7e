"""Principals cannot see each other's tasks at any door, and tokens bound what a task may use.

Pins issue 10's "tasks belong to principals": one real ``serve`` with named tokens (alice, bob,
an admin, and one allowed only server ``example`` and profile ``default``). A task alice submits
at any door is, to bob, a task that does not exist at every door: get, cancel, watch (REST SSE,
gRPC WatchTask, the MCP task and events resources) and list answer NotFound / 404 / NOT_FOUND
or leave it out, and bob's cancel leaves it running. The admin sees it everywhere and can
cancel it. The restricted token cannot name another server or profile, and sees only its own
server. An unknown, missing or malformed token is 401 / UNAUTHENTICATED at every route and RPC.
stdio (always the local user) is covered by the stdio tests.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import EmptyResult

from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.mcp_tasks import CancelTaskRequest, DetailedTask, GetTaskRequest, UpdateTaskRequest
from opspawn_mcp.mcp_tasks.wire import TaskIdParams, UpdateTaskParams
from tests.security.kit import (
    EXAMPLE_SERVER,
    GrpcDoor,
    Serve,
    capturing_llm,
    grpc_status_name,
    mcp_call,
    mcp_read,
    rest,
    run_serve,
)
from tests.servers.harness import HANG_GUARD_S, opspawn_command
from tests.support.serve import deployment_env, fake_llm_profile
from tests.support.tasks_client import TasksAware

TOKENS = {name: f"{name}-{uuid.uuid4().hex}" for name in ("alice", "bob", "root", "xonly")}
ALICE, BOB, ROOT, XONLY = (TOKENS[n] for n in ("alice", "bob", "root", "xonly"))
DOORS = ["mcp", "rest", "grpc"]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("principals")
    with capturing_llm() as llm:
        profile = fake_llm_profile(llm.base_url)
        opspawn = {
            "llm": profile,
            "models": {"strong": profile},
            "server": {
                "tokens": {
                    "alice": {"token_env": "SEC_ALICE"},
                    "bob": {"token_env": "SEC_BOB"},
                    "root": {"token_env": "SEC_ROOT", "admin": True},
                    "xonly": {"token_env": "SEC_XONLY", "servers": ["example"], "models": ["default"]},
                }
            },
        }
        env = {f"SEC_{name.upper()}": value for name, value in TOKENS.items()}
        servers = {"example": EXAMPLE_SERVER, "other": EXAMPLE_SERVER}
        with run_serve(tmp, opspawn, env=env, mcp_servers=servers) as running:
            yield running


# -- one operation at one door, as (outcome, payload) -----------------------------------------

NOT_FOUND = "not_found"


async def submit(serve: Serve, door: str, token: str, spec: dict[str, Any]) -> tuple[str, Any]:
    """``("ok", task id)`` or ``(error kind, message)``."""
    if door == "mcp":
        answer = await mcp_call(serve, token, "submit_task", spec)
        if answer.is_error:
            return answer.kind, answer.text
        assert answer.data is not None
        return "ok", answer.data["task_id"]
    if door == "rest":
        async with rest(serve, token) as client:
            r = await client.post("/v1/tasks", json=spec)
        return ("ok", r.json()["task_id"]) if r.status_code == 202 else (r.json()["kind"], r.text)
    async with GrpcDoor(serve) as g:
        sent = await g.call("SubmitTask", pb.SubmitTaskRequest(spec=pb.TaskSpec(**spec)), token)
    return ("ok", sent.reply.id) if sent.code == grpc.StatusCode.OK else (sent.code.name, sent.details)


@dataclass(frozen=True)
class TaskOperation:
    """One operation on an existing task as each door spells it, answered with the task:
    ``await op(serve, door, token, task_id)`` is ``("ok", status)`` or ``(error kind, detail)``.
    ``fields`` go into the MCP arguments, the REST body and the gRPC request alike."""

    tool: str
    method: str
    path: str
    rpc: str
    request: Callable[..., Any]
    fields: dict[str, Any] = field(default_factory=dict)

    async def __call__(self, serve: Serve, door: str, token: str, task_id: str) -> tuple[str, Any]:
        if door == "mcp":
            reply = await mcp_call(serve, token, self.tool, {"task_id": task_id, **self.fields})
            return (reply.kind, reply.text) if reply.is_error else ("ok", (reply.data or {})["status"])
        if door == "rest":
            async with rest(serve, token) as client:
                r = await client.request(
                    self.method, self.path.format(task_id=task_id), json=self.fields or None
                )
            return ("ok", r.json()["status"]) if r.status_code == 200 else (_rest_kind(r), r.text)
        async with GrpcDoor(serve) as g:
            got = await g.call(self.rpc, self.request(task_id=task_id, **self.fields), token)
        if got.reply is None:
            return _grpc_kind(got.code), got.details
        return "ok", grpc_status_name(got.reply)


get = TaskOperation("get_status", "GET", "/v1/tasks/{task_id}", "GetTask", pb.GetTaskRequest)
cancel = TaskOperation(
    "cancel_task", "POST", "/v1/tasks/{task_id}/cancel", "CancelTask", pb.CancelTaskRequest
)
answer = TaskOperation(
    "approve_task",
    "POST",
    "/v1/tasks/{task_id}/input",
    "AnswerTask",
    pb.AnswerTaskRequest,
    {"request_id": "r", "approve": True},
)
"""An approval answer (to a request the task may not even have)."""


async def watch(serve: Serve, door: str, token: str, task_id: str) -> list[tuple[str, Any]]:
    """Every way a door streams or reads a task's events; each refusal as (kind, detail)."""
    if door == "mcp":
        answers = [
            await mcp_read(serve, token, f"opspawn://tasks/{task_id}"),
            await mcp_read(serve, token, f"opspawn://tasks/{task_id}/events"),
        ]
        # A resource read the server refuses is an MCP error carrying the service's NotFound text.
        return [
            ("ok" if not a.is_error else NOT_FOUND if "No task with id" in a.text else "error", a.text)
            for a in answers
        ]
    if door == "rest":
        async with rest(serve, token) as client:
            outcomes = []
            for query in ("", "?after_seq=0"):
                async with client.stream("GET", f"/v1/tasks/{task_id}/events{query}") as r:
                    if r.status_code == 200:
                        outcomes.append(("ok", r.headers["content-type"]))
                        continue  # do not follow a live stream: closing it is enough
                    await r.aread()
                    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
                    outcomes.append((_rest_kind(r), r.text))
            return outcomes
    async with GrpcDoor(serve) as g:
        metadata = (("authorization", f"Bearer {token}"),)
        stream = g.stub.WatchTask(pb.WatchTaskRequest(task_id=task_id), metadata=metadata)
        try:
            await stream.read()  # the first event, or the refusal
        except grpc.aio.AioRpcError as exc:
            return [(_grpc_kind(exc.code()), exc.details())]
        stream.cancel()
        return [("ok", "streaming")]


async def listed(serve: Serve, door: str, token: str) -> list[str]:
    """The task ids the caller's list shows (one big page; the module makes few tasks)."""
    if door == "mcp":
        answer = await mcp_call(serve, token, "list_tasks", {"limit": 100})
        assert not answer.is_error, answer.text
        return [t["task_id"] for t in (answer.data or {})["tasks"]]
    if door == "rest":
        async with rest(serve, token) as client:
            r = await client.get("/v1/tasks", params={"limit": 100})
        assert r.status_code == 200, r.text
        return [t["task_id"] for t in r.json()["items"]]
    async with GrpcDoor(serve) as g:
        page = await g.call("ListTasks", pb.ListTasksRequest(limit=100), token)
    assert page.code == grpc.StatusCode.OK, page.details
    return [t.id for t in page.reply.items]


async def servers_seen(serve: Serve, door: str, token: str) -> list[str]:
    if door == "mcp":
        answer = await mcp_call(serve, token, "list_servers", {})
        assert not answer.is_error, answer.text
        return sorted(s["name"] for s in (answer.data or {})["servers"])
    async with rest(serve, token) as client:
        r = await client.get("/v1/servers")
    assert r.status_code == 200, r.text
    return sorted(s["name"] for s in r.json())


def _rest_kind(r: httpx.Response) -> str:
    kind: str = r.json().get("kind", str(r.status_code))
    return kind


def _grpc_kind(code: grpc.StatusCode) -> str:
    return {grpc.StatusCode.NOT_FOUND: NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED: "forbidden"}.get(
        code, code.name
    )


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("submit_door", DOORS)
async def test_bob_cannot_see_or_touch_alices_task_at_any_door(serve: Serve, submit_door: str) -> None:
    # A long sleep keeps the task running, so a cancel that got through would show.
    outcome, task_id = await submit(serve, submit_door, ALICE, {"goal": "sleep 30", "servers": ["example"]})
    assert outcome == "ok", task_id
    for door in DOORS:
        assert (await get(serve, door, BOB, task_id))[0] == NOT_FOUND, door
        assert (await cancel(serve, door, BOB, task_id))[0] == NOT_FOUND, door
        assert (await answer(serve, door, BOB, task_id))[0] == NOT_FOUND, door
        assert {kind for kind, _ in await watch(serve, door, BOB, task_id)} == {NOT_FOUND}, door
        assert task_id not in await listed(serve, door, BOB), door
        # ...while alice and the admin see it, at every door.
        for owner in (ALICE, ROOT):
            outcome, status = await get(serve, door, owner, task_id)
            assert outcome == "ok" and status in ("queued", "running"), (door, outcome, status)
            assert task_id in await listed(serve, door, owner), door
            assert {kind for kind, _ in await watch(serve, door, owner, task_id)} == {"ok"}, door
    # bob's cancels changed nothing; the admin's goes through.
    assert (await get(serve, "rest", ALICE, task_id))[1] in ("queued", "running")
    assert await cancel(serve, submit_door, ROOT, task_id) == ("ok", "cancelled")
    assert (await get(serve, "rest", ALICE, task_id)) == ("ok", "cancelled")


async def test_bob_sees_his_own_task_and_alice_does_not(serve: Serve) -> None:
    """The scope works both ways, and an admin's list holds everyone's tasks."""
    outcome, bobs = await submit(serve, "rest", BOB, {"goal": "echo mine", "servers": ["example"]})
    assert outcome == "ok", bobs
    for door in DOORS:
        assert (await get(serve, door, ALICE, bobs))[0] == NOT_FOUND, door
        assert bobs not in await listed(serve, door, ALICE), door
        assert bobs in await listed(serve, door, BOB), door
        assert bobs in await listed(serve, door, ROOT), door


@pytest.mark.parametrize("door", DOORS)
async def test_a_token_allowed_one_server_and_profile_cannot_use_others(serve: Serve, door: str) -> None:
    refused = await submit(serve, door, XONLY, {"goal": "echo x", "servers": ["other"]})
    assert refused[0] in ("forbidden", "PERMISSION_DENIED"), refused
    refused = await submit(serve, door, XONLY, {"goal": "echo x", "servers": ["example", "other"]})
    assert refused[0] in ("forbidden", "PERMISSION_DENIED"), refused
    refused = await submit(serve, door, XONLY, {"goal": "echo x", "model": {"profile": "strong"}})
    assert refused[0] in ("forbidden", "PERMISSION_DENIED"), refused
    # Omitting servers means "all I may use", resolved at submit time to the allowlist.
    outcome, task_id = await submit(serve, door, XONLY, {"goal": "echo x"})
    assert outcome == "ok", task_id
    async with rest(serve, XONLY) as client:
        task = (await client.get(f"/v1/tasks/{task_id}")).json()
    assert task["spec"]["servers"] == ["example"], task["spec"]
    if door != "grpc":  # the gRPC door has no server listing
        assert await servers_seen(serve, door, XONLY) == ["example"]
        assert await servers_seen(serve, door, ALICE) == ["example", "other"]


HTTP_ROUTES = [
    ("POST", "/mcp"),
    ("GET", "/mcp"),
    ("GET", "/sse"),
    ("POST", "/messages/?session_id=0123"),
    ("POST", "/v1/tasks"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/some-id"),
    ("POST", "/v1/tasks/some-id/cancel"),
    ("POST", "/v1/tasks/some-id/input"),
    ("GET", "/v1/tasks/some-id/events"),
    ("GET", "/v1/servers"),
    ("GET", "/v1/audit"),
    ("GET", "/openapi.json"),
]
BAD_AUTHORIZATION = [
    None,
    "Bearer wrong-token",
    f"Bearer {ALICE}x",
    f"Bearer {ALICE[:-1]}",
    f"Basic {ALICE}",
    ALICE,
    "Bearer",
]


async def test_an_unknown_or_missing_token_is_401_at_every_http_route(serve: Serve) -> None:
    async with httpx.AsyncClient(base_url=serve.http, timeout=30) as client:
        for authorization in BAD_AUTHORIZATION:
            headers = {"authorization": authorization} if authorization else {}
            for method, path in HTTP_ROUTES:
                body = {"goal": "echo x"} if method == "POST" else None
                r = await client.request(method, path, headers=headers, json=body)
                assert r.status_code == 401, (method, path, authorization, r.status_code, r.text[:200])
                assert r.headers["content-type"].startswith("application/problem+json"), r.headers
                assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers
        # The probes stay open: they name no task.
        for path in ("/healthz", "/readyz"):
            assert (await client.get(path)).status_code == 200


async def test_an_unknown_or_missing_token_is_unauthenticated_at_every_rpc_and_the_mcp_door(
    serve: Serve,
) -> None:
    async with GrpcDoor(serve) as g:
        calls: list[tuple[str, Any]] = [
            ("SubmitTask", pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="echo x"))),
            ("GetTask", pb.GetTaskRequest(task_id="some-id")),
            ("ListTasks", pb.ListTasksRequest()),
            ("CancelTask", pb.CancelTaskRequest(task_id="some-id")),
            ("AnswerTask", pb.AnswerTaskRequest(task_id="some-id", request_id="r", approve=True)),
        ]
        for token in (None, "wrong-token", f"{ALICE}x"):
            for method, request in calls:
                answer = await g.call(method, request, token)
                assert answer.code == grpc.StatusCode.UNAUTHENTICATED, (method, token, answer.code)
            assert [k for k, _ in await _grpc_watch_kinds(g, token)] == ["UNAUTHENTICATED"]
    for token in (None, "wrong-token"):
        answer = await mcp_call(serve, token, "list_tasks", {})
        assert answer.http_status == 401, answer


async def _grpc_watch_kinds(g: GrpcDoor, token: str | None) -> list[tuple[str, str]]:
    answer = await g.watch("some-id", token)
    return [(answer.code.name, answer.details)]


def test_the_cli_speaks_as_the_principal_of_opspawn_token(serve: Serve, tmp_path: Path) -> None:
    """``opspawn-mcp status`` is an MCP client like any other: ``$OPSPAWN_TOKEN`` names its caller."""

    def status(task_id: str, token: str | None) -> subprocess.CompletedProcess[str]:
        env = deployment_env() if token is None else deployment_env(OPSPAWN_TOKEN=token)
        return subprocess.run(
            [opspawn_command(), "status", task_id, "--url", serve.mcp, "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            check=False,
        )

    r = httpx.post(
        f"{serve.http}/v1/tasks",
        json={"goal": "echo cli", "servers": ["example"]},
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=HANG_GUARD_S,
    )
    task_id = r.json()["task_id"]
    mine = status(task_id, ALICE)
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout)["task_id"] == task_id
    theirs = status(task_id, BOB)
    assert theirs.returncode == 2 and "Traceback" not in theirs.stderr
    assert theirs.stderr.startswith(f"opspawn-mcp: No task with id {task_id!r}.")
    anonymous = status(task_id, None)
    assert (
        anonymous.returncode == 2 and "HTTP 401" in anonymous.stderr and "OPSPAWN_TOKEN" in anonymous.stderr
    )


async def test_bob_cannot_follow_or_stop_alices_task_over_mcp_tasks(serve: Serve) -> None:
    """The tasks extension's methods are scoped like the tools: another principal's task id is
    unknown (-32602), to tasks/get, tasks/update and tasks/cancel alike."""
    outcome, task_id = await submit(serve, "rest", ALICE, {"goal": "sleep 30", "servers": ["example"]})
    assert outcome == "ok", task_id
    params = TaskIdParams(task_id=task_id)
    requests: list[tuple[Any, type[Any]]] = [
        (GetTaskRequest(params=params), DetailedTask),
        (UpdateTaskRequest(params=UpdateTaskParams(task_id=task_id)), EmptyResult),
        (CancelTaskRequest(params=params), EmptyResult),
    ]
    async with tasks_session(serve, BOB) as bob:
        for request, result in requests:
            with pytest.raises(MCPError) as refused:
                await bob.session.send_request(request, result)
            assert refused.value.code == -32602, request.method
    async with tasks_session(serve, ALICE) as alice:
        seen = await alice.session.send_request(GetTaskRequest(params=params), DetailedTask)
        assert seen.status == "working"
        await alice.session.send_request(CancelTaskRequest(params=params), EmptyResult)
    assert await get(serve, "rest", ALICE, task_id) == ("ok", "cancelled")


@asynccontextmanager
async def tasks_session(serve: Serve, token: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=None)) as http,
        Client(streamable_http_client(serve.mcp, http_client=http), extensions=[TasksAware()]) as client,
    ):
        yield client
