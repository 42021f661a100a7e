"""Per-principal limits answer 429 / RESOURCE_EXHAUSTED / a rate_limited tool error, and
per-task budgets stop a task in the worker of a real ``serve``.

Pins issue 10's "limits per principal": a token with ``max_in_flight: 1`` whose first task is
still running (the example server's 30 s sleep), and a token with ``submits_per_minute: 1,
submit_burst: 1`` that has spent its one submit, are refused at every door with a hint of when
to retry: REST 429 + an integer ``Retry-After``, gRPC RESOURCE_EXHAUSTED + ``retry-after``
trailing metadata, an MCP tool error saying ``rate_limited: ... Retry in N s.``; a refused
submit creates no task. Budgets are enforced while the task runs: a token with
``max_tool_calls: 1`` whose model asks for two echo calls ends ``failed`` naming the budget,
``max_task_tokens`` fails a task at its first LLM reply, ``max_task_seconds`` caps the run time;
asking for more than a limit allows is refused at submit time. Deterministic: no clock is
raced (one submit per minute cannot refill during the test), nothing asserts on durations.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from tests.security.kit import (
    TWICE,
    GrpcDoor,
    Serve,
    capturing_llm,
    mcp_call,
    rest,
    run_serve,
    wait_done,
)
from tests.support.serve import fake_llm_profile

LIMITS = {
    "one": {"max_in_flight": 1},
    "slow": {"submits_per_minute": 1, "submit_burst": 1},
    "frugal": {"max_tool_calls": 1},
    "stingy": {"max_task_tokens": 5},
    "brief": {"max_task_seconds": 1},
}
TOKENS = {name: f"{name}-{uuid.uuid4().hex}" for name in [*LIMITS, "root"]}
DOORS = ["mcp", "rest", "grpc"]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("limits")
    with capturing_llm() as llm:
        tokens: dict[str, Any] = {
            name: {"token_env": f"SEC_{name.upper()}", "limits": limits} for name, limits in LIMITS.items()
        }
        tokens["root"] = {"token_env": "SEC_ROOT", "admin": True}
        opspawn = {
            "llm": fake_llm_profile(llm.base_url),
            "server": {"tokens": tokens},
        }
        env = {f"SEC_{name.upper()}": value for name, value in TOKENS.items()}
        with run_serve(tmp, opspawn, env=env) as running:
            yield running


async def _submit(serve: Serve, door: str, token: str, spec: dict[str, Any]) -> dict[str, Any]:
    """What the door answered, reduced to: ok + task id, or the refusal and its retry hint."""
    if door == "mcp":
        answer = await mcp_call(serve, token, "submit_task", spec)
        if not answer.is_error:
            return {"ok": True, "id": (answer.data or {})["task_id"]}
        return {"ok": False, "kind": answer.kind, "text": answer.text}
    if door == "rest":
        async with rest(serve, token) as client:
            r = await client.post("/v1/tasks", json=spec)
        if r.status_code == 202:
            return {"ok": True, "id": r.json()["task_id"]}
        assert r.headers["content-type"].startswith("application/problem+json"), r.headers
        return {
            "ok": False,
            "status": r.status_code,
            "kind": r.json()["kind"],
            "text": r.text,
            "headers": r.headers,
        }
    async with GrpcDoor(serve) as g:
        sent = await g.call("SubmitTask", pb.SubmitTaskRequest(spec=pb.TaskSpec(**spec)), token)
    if sent.code == grpc.StatusCode.OK:
        return {"ok": True, "id": sent.reply.id}
    return {"ok": False, "code": sent.code, "text": sent.details, "trailing": sent.trailing}


def _assert_rate_limited(door: str, answer: dict[str, Any], limit_word: str) -> None:
    assert not answer["ok"], (door, answer)
    if door == "mcp":
        assert answer["kind"] == "rate_limited", answer
        assert "Retry in" in answer["text"] and limit_word in answer["text"], answer
    elif door == "rest":
        assert (answer["status"], answer["kind"]) == (429, "rate_limited"), answer
        retry = answer["headers"].get("retry-after", "")
        assert retry.isdigit() and int(retry) >= 1, f"Retry-After must be integer seconds, got {retry!r}"
    else:
        assert answer["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
        retry = answer["trailing"].get("retry-after", "")
        assert retry.isdigit() and int(retry) >= 1, (
            f"retry-after metadata must be integer seconds, got {retry!r}"
        )
        assert limit_word in answer["text"], answer


async def _count(serve: Serve, token: str) -> int:
    async with rest(serve, token) as client:
        r = await client.get("/v1/tasks", params={"limit": 100})
    assert r.status_code == 200, r.text
    return len(r.json()["items"])


async def test_max_in_flight_refuses_a_second_task_at_every_door_until_the_first_ends(serve: Serve) -> None:
    token = TOKENS["one"]
    first = await _submit(serve, "rest", token, {"goal": "sleep 30", "servers": ["example"]})
    assert first["ok"], first
    before = await _count(serve, token)
    for door in DOORS:
        answer = await _submit(serve, door, token, {"goal": "echo second", "servers": ["example"]})
        _assert_rate_limited(door, answer, "limit")
    assert await _count(serve, token) == before, "a refused submit created a task"
    async with rest(serve, token) as client:
        assert (await client.post(f"/v1/tasks/{first['id']}/cancel")).json()["status"] == "cancelled"
    # Once the first has ended, the slot is free again.
    again = await _submit(serve, "grpc", token, {"goal": "echo again", "servers": ["example"]})
    assert again["ok"], again
    assert (await wait_done(serve, token, again["id"]))["status"] == "completed"


async def test_the_submit_rate_refuses_at_every_door_with_when_to_retry(serve: Serve) -> None:
    token = TOKENS["slow"]
    first = await _submit(serve, "mcp", token, {"goal": "echo first", "servers": ["example"]})
    assert first["ok"], first
    for door in DOORS:
        answer = await _submit(serve, door, token, {"goal": "echo too soon", "servers": ["example"]})
        _assert_rate_limited(door, answer, "per minute")
        if door == "rest":
            assert int(answer["headers"]["retry-after"]) <= 60, answer["headers"]
    assert await _count(serve, token) == 1, "a refused submit created a task"
    # One principal's limit is not another's: alice-like callers without limits are untouched.
    other = await _submit(serve, "rest", TOKENS["root"], {"goal": "echo unlimited", "servers": ["example"]})
    assert other["ok"], other


async def test_a_task_over_its_tool_call_budget_fails_naming_it(serve: Serve) -> None:
    token = TOKENS["frugal"]
    sent = await _submit(serve, "rest", token, {"goal": TWICE, "servers": ["example"]})
    assert sent["ok"], sent
    task = await wait_done(serve, token, sent["id"])
    assert task["spec"]["budget"]["max_tool_calls"] == 1, task["spec"]
    assert task["status"] == "failed", task
    assert "max_tool_calls" in (task["error"] or ""), task["error"]
    async with rest(serve, token) as client:
        r = await client.get(f"/v1/tasks/{sent['id']}/events")
    calls = [line for line in r.text.splitlines() if line == "event: tool_call"]
    assert len(calls) <= 1, f"the call beyond the budget ran: {r.text[:2000]}"


async def test_a_task_over_its_token_budget_fails_naming_it(serve: Serve) -> None:
    token = TOKENS["stingy"]
    sent = await _submit(serve, "rest", token, {"goal": "echo a goal that costs more than five tokens"})
    assert sent["ok"], sent
    task = await wait_done(serve, token, sent["id"])
    assert task["spec"]["budget"]["max_llm_tokens"] == 5, task["spec"]
    assert task["status"] == "failed", task
    assert any(
        word in (task["error"] or "") for word in ("max_total_tokens", "max_llm_tokens", "max_task_tokens")
    ), task


async def test_a_task_is_capped_at_its_principals_wall_time(serve: Serve) -> None:
    token = TOKENS["brief"]
    sent = await _submit(serve, "rest", token, {"goal": "sleep 30", "servers": ["example"]})
    assert sent["ok"], sent
    task = await wait_done(serve, token, sent["id"])
    assert task["spec"]["timeout_s"] == 1, task["spec"]
    assert task["status"] == "failed" and "timeout_s" in (task["error"] or ""), task


@pytest.mark.parametrize("door", DOORS)
async def test_asking_for_more_than_a_limit_allows_is_refused(serve: Serve, door: str) -> None:
    for token, spec, field in (
        (TOKENS["frugal"], {"goal": "echo x", "budget": {"max_tool_calls": 5}}, "budget.max_tool_calls"),
        (TOKENS["stingy"], {"goal": "echo x", "budget": {"max_llm_tokens": 6}}, "budget.max_llm_tokens"),
        (TOKENS["brief"], {"goal": "echo x", "timeout_s": 10}, "timeout_s"),
    ):
        answer = await _submit(serve, door, token, spec)
        assert not answer["ok"], (door, spec, answer)
        if door == "grpc":
            assert answer["code"] == grpc.StatusCode.INVALID_ARGUMENT, answer
        else:
            assert answer["kind"] == "invalid_input", answer
        assert field in answer["text"], answer
