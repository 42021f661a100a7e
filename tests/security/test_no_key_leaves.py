"""No key leaves the process except to its own profile's endpoint, whatever a client sends.

Pins issue 10's key leak: a client could once set ``model.base_url`` (the worker then sent the
configured key, the prompt and the tool results to that URL) or name any environment variable
as ``model.api_key_env`` (its value went to the LLM). One real ``serve`` runs with its default
profile on a capturing LLM (``api_key_env: PROFILE_KEY``), three named tokens, and more secrets
in its environment: ``OPENAI_API_KEY``, ``OPENAI_BASE_URL`` pointing at a trap listener,
``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``, ``SOME_OTHER_SECRET``. At every door (MCP streamable
HTTP, REST, gRPC) each attacker's request is refused with that door's typed error, and valid
tasks complete. Then: the trap got no connection; the LLM got exactly ``Authorization: Bearer
<PROFILE_KEY>`` and no other secret value in any header or body; no secret value is in any
answer (tasks, events, lists, errors) or in serve's log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from tests.security.kit import (
    GrpcDoor,
    Serve,
    Trap,
    capturing_llm,
    field_bytes,
    grpc_status_name,
    mcp_call,
    mcp_read,
    rest,
    run_serve,
    wait_done,
)
from tests.servers.harness import HANG_GUARD_S
from tests.support.fake_openai import FakeOpenAIServer


def _secret(name: str) -> str:
    return f"{name.lower()}-{uuid.uuid4().hex}"


PROFILE_KEY = _secret("sk-profile")
TOKENS = {"alice": _secret("tok-alice"), "bob": _secret("tok-bob"), "root": _secret("tok-root")}
TOKEN_ENVS = {name: f"SEC_{name.upper()}_TOKEN" for name in TOKENS}
OTHER_SECRETS = {
    "OPENAI_API_KEY": _secret("sk-ambient"),
    "OPENAI_ORG_ID": _secret("org"),
    "OPENAI_ORGANIZATION": _secret("org2"),
    "OPENAI_PROJECT_ID": _secret("proj"),
    "SOME_OTHER_SECRET": _secret("other"),
    **{TOKEN_ENVS[n]: v for n, v in TOKENS.items()},
}
"""Every env value that must never leave the process (the profile key may go to its endpoint)."""
ALICE = TOKENS["alice"]


@dataclass
class World:
    serve: Serve
    trap: Trap
    llm: FakeOpenAIServer
    answers: list[str] = field(default_factory=list)

    def seen(self, *texts: Any) -> None:
        """Keep what a client was told, for the no-secret-in-any-answer check."""
        self.answers.extend(t if isinstance(t, str) else repr(t) for t in texts)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("no-key-leaves")
    with Trap() as trap, capturing_llm() as llm:
        _prove_the_trap_records(trap)
        env = {
            "PROFILE_KEY": PROFILE_KEY,
            "OPENAI_BASE_URL": trap.url,
            "OPENAI_API_BASE": trap.url,
            **OTHER_SECRETS,
        }
        opspawn = {
            "llm": {
                "provider": "openai",
                "base_url": llm.base_url,
                "model": "fake-model",
                "api_key_env": "PROFILE_KEY",
                "timeout_s": 30,
            },
            "server": {
                "tokens": {
                    "alice": {"token_env": TOKEN_ENVS["alice"]},
                    "bob": {"token_env": TOKEN_ENVS["bob"]},
                    "root": {"token_env": TOKEN_ENVS["root"], "admin": True},
                }
            },
        }
        with run_serve(tmp, opspawn, env=env) as serve:
            yield World(serve, trap, llm)


def _prove_the_trap_records(trap: Trap) -> None:
    """A trap that cannot see a connection would make every "0 connections" below vacuous."""
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{trap.url}/chat/completions", content=b"probe", timeout=0.5)
    deadline = time.monotonic() + HANG_GUARD_S
    while b"probe" not in trap.received:
        assert time.monotonic() < deadline, "the trap recorded nothing"
        time.sleep(0.01)
    trap.connections.clear()


ENV_NAMES = ["PROFILE_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", *OTHER_SECRETS]


def attacks(trap_url: str) -> list[dict[str, Any]]:
    """Task specs an attacker sends; every one must be refused before anything runs."""
    model_attacks: list[dict[str, Any]] = [
        {"base_url": trap_url},
        {"profile": "default", "base_url": trap_url},
        *({"api_key_env": name} for name in ENV_NAMES),
        {"profile": "default", "api_key_env": "OPENAI_API_KEY"},
        {"provider": "openai"},
        {"model": "gpt-4o"},
        {"api_key": "sk-attacker"},
        {"profile": "default", "headers": {"OpenAI-Organization": "x"}},
        {"profile": "no-such-profile"},
        {"profile": "${OPENAI_API_KEY}"},
        {"profile": "../default"},
    ]
    specs: list[dict[str, Any]] = [{"goal": "echo attack", "model": m} for m in model_attacks]
    specs += [
        {"goal": "echo attack", "model": trap_url},
        {"goal": "echo attack", "base_url": trap_url},
        {"goal": "echo attack", "api_key_env": "OPENAI_API_KEY"},
        {"goal": "echo attack", "servers": [trap_url]},
        {"goal": "echo attack", "mcpServers": {"evil": {"url": trap_url}}},
    ]
    return specs


REFUSED_REST = {422, 403}
REFUSED_MCP = {"invalid_input", "forbidden"}
REFUSED_GRPC = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}


def _pb_spec(spec: dict[str, Any]) -> pb.TaskSpec | None:
    """The spec as the generated message, or None when the proto cannot even express it."""
    try:
        return pb.TaskSpec(**spec)
    except (ValueError, TypeError):
        return None


def _assert_clean(world: World) -> None:
    """The invariants, over everything that has happened in this module so far."""
    assert world.trap.connections == [], f"the trap was reached: {world.trap.received[:500]!r}"
    requests = world.llm.fake.raw_requests
    for request in requests:
        assert request.header("authorization") == [f"Bearer {PROFILE_KEY}"], request.headers
        others = [(k, v) for k, v in request.headers if k != "authorization"]
        assert not any(PROFILE_KEY in k or PROFILE_KEY in v for k, v in others), others
        assert PROFILE_KEY.encode() not in request.body
        for name, value in OTHER_SECRETS.items():
            assert not request.contains(value), f"{name}'s value reached the LLM"
        assert not request.contains(world.trap.url.removesuffix("/v1")), "the trap URL reached the LLM"
    for text in world.answers:
        for name, value in {"PROFILE_KEY": PROFILE_KEY, **OTHER_SECRETS}.items():
            assert value not in text, f"{name}'s value is in an answer: {text[:300]}"
    log = world.serve.log_text()
    for name, value in {"PROFILE_KEY": PROFILE_KEY, **OTHER_SECRETS}.items():
        assert value not in log, f"{name}'s value is in serve's log"
    assert "Traceback" not in log, log[-3000:]


async def _submit_valid(world: World, door: str, goal: str, **extra: Any) -> dict[str, Any]:
    """Submit ``goal`` as alice at ``door``; the finished task as REST shows it."""
    spec = {"goal": goal, "servers": ["example"], **extra}
    if door == "mcp":
        answer = await mcp_call(world.serve, ALICE, "submit_task", spec)
        world.seen(answer.text, answer.data)
        assert not answer.is_error, answer.text
        assert answer.data is not None
        task_id = answer.data["task_id"]
    elif door == "rest":
        async with rest(world.serve, ALICE) as client:
            r = await client.post("/v1/tasks", json=spec)
        world.seen(r.text)
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
    else:
        async with GrpcDoor(world.serve) as grpc_door:
            sent = await grpc_door.call("SubmitTask", pb.SubmitTaskRequest(spec=pb.TaskSpec(**spec)), ALICE)
        world.seen(sent.reply, sent.details)
        assert sent.code == grpc.StatusCode.OK, sent.details
        task_id = sent.reply.id
    return await wait_done(world.serve, ALICE, task_id)


DOORS = ["mcp", "rest", "grpc"]


@pytest.mark.parametrize("door", DOORS)
async def test_every_endpoint_or_env_field_is_refused_with_the_doors_typed_error(
    world: World, door: str
) -> None:
    before = len(world.llm.fake.raw_requests)
    refused: list[str] = []
    async with GrpcDoor(world.serve) as grpc_door:
        for spec in attacks(world.trap.url):
            if door == "mcp":
                answer = await mcp_call(world.serve, ALICE, "submit_task", spec)
                world.seen(answer.text, answer.data)
                assert answer.is_error and answer.kind in REFUSED_MCP, (spec, answer)
                assert "Traceback" not in answer.text
                refused.append(answer.kind)
            elif door == "rest":
                async with rest(world.serve, ALICE) as client:
                    r = await client.post("/v1/tasks", json=spec)
                world.seen(r.text)
                assert r.status_code in REFUSED_REST, (spec, r.status_code, r.text)
                assert r.headers["content-type"].startswith("application/problem+json"), r.headers
                assert r.json()["kind"] in REFUSED_MCP and "Traceback" not in r.text, r.text
                refused.append(str(r.status_code))
            else:
                message = _pb_spec(spec)
                if message is None:
                    continue  # the proto has no such field: a client cannot even encode it
                sent = await grpc_door.call("SubmitTask", pb.SubmitTaskRequest(spec=message), ALICE)
                world.seen(sent.reply, sent.details)
                assert sent.code in REFUSED_GRPC, (spec, sent.code, sent.details)
                assert "Traceback" not in sent.details
                refused.append(sent.code.name)
    assert refused, "no attack was tried"
    # Refused requests ran nothing: not one LLM call was made while they were answered.
    assert len(world.llm.fake.raw_requests) == before
    _assert_clean(world)


async def test_fields_the_proto_reserved_steer_nothing(world: World) -> None:
    """A gRPC client can still put bytes in ModelSettings' reserved fields 1-4 (provider,
    base_url, model, api_key_env); the server must refuse them or ignore them, never obey."""
    model = (
        field_bytes(1, "openai")
        + field_bytes(2, world.trap.url)
        + field_bytes(3, "gpt-4o")
        + field_bytes(4, "OPENAI_API_KEY")
    )
    spec = field_bytes(1, "echo reserved") + field_bytes(3, model) + field_bytes(4, "example")
    async with GrpcDoor(world.serve) as grpc_door:
        sent = await grpc_door.submit_raw(field_bytes(1, spec), ALICE)
    world.seen(sent.reply, sent.details)
    assert sent.code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (sent.code, sent.details)
    if sent.code == grpc.StatusCode.OK:
        assert sent.reply.spec.model.profile == "default"
        done = await wait_done(world.serve, ALICE, sent.reply.id)
        world.seen(json.dumps(done))
        assert (done["status"], done["result"]) == ("completed", "done: reserved"), done
    _assert_clean(world)


@pytest.mark.parametrize("door", DOORS)
async def test_a_valid_task_completes_and_only_the_profile_key_reaches_only_the_profile(
    world: World, door: str
) -> None:
    # Env references in client text are text: nothing of the client's is ever interpolated.
    sneaky = "${SOME_OTHER_SECRET} $OPENAI_API_KEY ${PROFILE_KEY}"
    done = await _submit_valid(world, door, f"echo {door} {sneaky}", system_prompt="${OPENAI_API_KEY}")
    world.seen(json.dumps(done))
    assert (done["status"], done["result"]) == ("completed", f"done: {door} {sneaky}"), done
    assert done["spec"]["model"]["profile"] == "default"
    # Everything a client can read about it, at every door, goes through the answer check.
    task_id = done["task_id"]
    for token in (ALICE, TOKENS["root"]):
        async with rest(world.serve, token) as client:
            world.seen((await client.get(f"/v1/tasks/{task_id}")).text)
            world.seen((await client.get("/v1/tasks")).text)
            world.seen((await client.get(f"/v1/tasks/{task_id}/events")).text)
            world.seen((await client.get("/v1/servers")).text)
            world.seen((await client.post(f"/v1/tasks/{task_id}/cancel")).text)  # a 409 problem
            world.seen((await client.get("/v1/tasks/no-such-task")).text)
        world.seen((await mcp_call(world.serve, token, "get_status", {"task_id": task_id})).text)
        world.seen((await mcp_call(world.serve, token, "list_tasks", {})).text)
        world.seen((await mcp_read(world.serve, token, f"opspawn://tasks/{task_id}/events")).text)
        async with GrpcDoor(world.serve) as grpc_door:
            got = await grpc_door.call("GetTask", pb.GetTaskRequest(task_id=task_id), token)
            assert got.code == grpc.StatusCode.OK and grpc_status_name(got.reply) == "completed"
            world.seen(got.reply, (await grpc_door.call("ListTasks", pb.ListTasksRequest(), token)).reply)
            world.seen((await grpc_door.watch(task_id, token)).reply)
    assert world.llm.fake.raw_requests, "the task never reached the profile's endpoint"
    _assert_clean(world)


async def test_an_unknown_token_gets_nothing_and_leaks_nothing(world: World) -> None:
    """Even a refusal names no token: ``Bearer <one of the other secrets>`` is just wrong."""
    wrong = OTHER_SECRETS["OPENAI_API_KEY"]
    async with rest(world.serve, wrong) as client:
        r = await client.post("/v1/tasks", json={"goal": "echo x"})
    assert r.status_code == 401, r.text
    world.seen(r.text.replace(wrong, "<the caller's own token>"))
    answer = await mcp_call(world.serve, wrong, "list_tasks", {})
    assert answer.http_status == 401, answer
    async with GrpcDoor(world.serve) as grpc_door:
        sent = await grpc_door.call("ListTasks", pb.ListTasksRequest(), wrong)
    assert sent.code == grpc.StatusCode.UNAUTHENTICATED, sent
    assert wrong not in sent.details and wrong not in r.text
    _assert_clean(world)
