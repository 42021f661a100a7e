"""The REST gateway's HTTP mapping, against the real TaskService and memory store.

The service's rules are tested in test_service.py; here each test checks only how HTTP
carries them: statuses, problem documents, headers, the SSE framing. The app under test is the
one ``serve_http`` serves (``build_http_app``: the MCP and REST routes behind the HTTP guard);
the guard's own rules are tested in test_http_guard.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import jsonschema
import pytest
import uvicorn
from starlette.applications import Starlette

from gateway.app import MAX_BODY_BYTES, gateway_routes
from opspawn_mcp.config import parse_config
from opspawn_mcp.errors import PROBLEM_MEDIA_TYPE, Unavailable
from opspawn_mcp.http_guard import HttpGuard
from opspawn_mcp.mcp_http import build_http_app
from opspawn_mcp.models import ExposedCall, TaskEvent
from opspawn_mcp.principals import LOCAL, Principals
from opspawn_mcp.server import build_server
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from opspawn_mcp.ui import dashboard_routes
from tests.support.service_kit import (
    WARNING,
    BrokenStore,
    CountingStore,
    RecordingEnqueuer,
    finish,
    make_service,
)

TOKEN = "s3cret-token"
BASE = "http://localhost"


def principals_with(
    tokens: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> Principals:
    config = parse_config({"opspawn": {"server": {"tokens": tokens or {}}}}, environ=environ or {})
    return Principals.from_config(config, environ or {})


def http_app(
    service: TaskService,
    principals: Principals | None = None,
    port: int = 0,
    allowed_hosts: Sequence[str] = (),
    **gateway: Any,
) -> Starlette:
    """The app ``Runtime.http_app`` builds, for ``service``: MCP, REST and the dashboard behind
    one guard."""
    principals = principals or principals_with()
    rest = gateway_routes(service, auth_required=principals.auth_required, **gateway)
    ui = dashboard_routes(service, principals)
    guard = HttpGuard.for_server(principals, "127.0.0.1", port, allowed_hosts=allowed_hosts)
    return build_http_app(build_server(service), guard, extra_routes=[*rest, *ui])


@pytest.fixture
async def client(service: TaskService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=http_app(service))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        yield c


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["kind"] == kind
    assert body["type"] == f"urn:opspawn:problem:{kind}"
    assert body["title"] and body["detail"]
    return body


def parse_sse(text: str) -> list[dict[str, str]]:
    """Each SSE message's fields; several ``data`` lines joined with newlines, as EventSource does."""
    events = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            fields[key] = f"{fields[key]}\n{value}" if key == "data" and key in fields else value
        events.append(fields)
    return events


# -- submit -----------------------------------------------------------------------------


async def test_submit_returns_202_with_location_and_the_queued_task(
    client: httpx.AsyncClient, enqueuer: RecordingEnqueuer
) -> None:
    r = await client.post("/v1/tasks", json={"goal": "echo hi", "max_steps": 3})
    assert r.status_code == 202
    task = r.json()
    assert task["status"] == "queued"
    assert task["spec"]["max_steps"] == 3
    assert enqueuer.ids == [task["task_id"]]
    assert r.headers["location"] == f"/v1/tasks/{task['task_id']}"  # a path, as docs/rest.md shows
    again = await client.get(r.headers["location"])
    assert again.status_code == 200
    assert again.json()["task_id"] == task["task_id"]
    assert again.json()["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}


async def test_a_completed_tasks_warning_is_in_its_json_and_the_openapi_document(
    client: httpx.AsyncClient, store: MemoryStore
) -> None:
    task_id = (await client.post("/v1/tasks", json={"goal": "g"})).json()["task_id"]
    assert (await client.get(f"/v1/tasks/{task_id}")).json()["warning"] is None
    await finish(store, task_id, "done: disk full", warning=WARNING)
    shown = (await client.get(f"/v1/tasks/{task_id}")).json()
    assert (shown["status"], shown["result"], shown["warning"]) == ("completed", "done: disk full", WARNING)
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["Task"]
    assert schema["properties"]["warning"]["anyOf"] == [{"type": "string"}, {"type": "null"}]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[" * 100_000, b"\xff\xfe"])
async def test_malformed_json_is_400(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    assert_problem(r, 400, "malformed_json")


async def test_declared_oversized_body_is_413_before_reading(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/tasks", content=b"{}" + b" " * MAX_BODY_BYTES, headers={"content-type": "application/json"}
    )
    assert_problem(r, 413, "payload_too_large")


async def test_chunked_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"goal": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536

    r = await client.post("/v1/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "payload_too_large")


async def test_invalid_spec_is_422_with_the_field_locations(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/tasks", json={"goal": "x", "max_steps": 0, "colour": "red"})
    body = assert_problem(r, 422, "invalid_input")
    joined = "\n".join(body["problems"])
    assert "max_steps:" in joined
    assert "colour: unknown field" in joined


async def test_a_json_array_is_422_not_400(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/v1/tasks", json=["goal"]), 422, "invalid_input")


async def test_unknown_server_is_403(client: httpx.AsyncClient) -> None:
    body = assert_problem(
        await client.post("/v1/tasks", json={"goal": "x", "servers": ["evil"]}), 403, "forbidden"
    )
    assert body["servers"] == ["evil"]


# -- read -------------------------------------------------------------------------------


async def test_unknown_task_is_404_naming_the_id(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/v1/tasks/nope"), 404, "not_found")
    assert body["task_id"] == "nope"


async def test_list_filters_by_status_and_pages_with_the_cursor(
    client: httpx.AsyncClient, store: MemoryStore
) -> None:
    ids = [(await client.post("/v1/tasks", json={"goal": f"g{i}"})).json()["task_id"] for i in range(5)]
    await finish(store, ids[0], "ok")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"status": "queued", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/tasks", params=params)).json()
        seen += [t["task_id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids[1:])
    completed = (await client.get("/v1/tasks", params={"status": "completed"})).json()
    assert [t["task_id"] for t in completed["items"]] == [ids[0]]
    found = (await client.get("/v1/tasks", params={"goal_contains": "G3"})).json()
    assert [t["task_id"] for t in found["items"]] == [ids[3]]


@pytest.mark.parametrize(
    "params", [{"limit": "0"}, {"limit": "lots"}, {"limit": "9" * 30}, {"status": "asleep"}, {"cursor": "zz"}]
)
async def test_bad_list_query_is_422(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    assert_problem(await client.get("/v1/tasks", params=params), 422, "invalid_input")


# -- cancel -----------------------------------------------------------------------------


async def test_cancel_then_cancel_a_finished_task_is_409(
    client: httpx.AsyncClient, store: MemoryStore
) -> None:
    a = (await client.post("/v1/tasks", json={"goal": "a"})).json()["task_id"]
    r = await client.post(f"/v1/tasks/{a}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    b = (await client.post("/v1/tasks", json={"goal": "b"})).json()["task_id"]
    await finish(store, b, "ok")
    assert_problem(await client.post(f"/v1/tasks/{b}/cancel"), 409, "conflict")
    assert_problem(await client.post("/v1/tasks/nope/cancel"), 404, "not_found")


# -- events (SSE) -----------------------------------------------------------------------


async def test_events_stream_ends_with_the_task_and_resumes_after_last_event_id(
    client: httpx.AsyncClient, store: MemoryStore
) -> None:
    task_id = (await client.post("/v1/tasks", json={"goal": "g"})).json()["task_id"]
    await finish(store, task_id, "42")
    r = await client.get(f"/v1/tasks/{task_id}/events")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert [e["event"] for e in events] == ["state", "state", "final", "state"]
    assert [e["id"] for e in events] == ["1", "2", "3", "4"]
    assert json.loads(events[2]["data"])["data"] == {"result": "42"}
    resumed = await client.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "2"})
    assert [e["id"] for e in parse_sse(resumed.text)] == ["3", "4"]
    by_query = await client.get(f"/v1/tasks/{task_id}/events", params={"after_seq": 3})
    assert [e["id"] for e in parse_sse(by_query.text)] == ["4"]


async def test_every_sse_event_is_the_documented_task_event(
    client: httpx.AsyncClient, store: MemoryStore
) -> None:
    document = (await client.get("/openapi.json")).json()
    media = document["paths"]["/v1/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"]
    name = media["text/event-stream"]["x-sse-data"]["$ref"].rsplit("/", 1)[-1]
    validator = jsonschema.Draft202012Validator(document["components"]["schemas"][name])
    task_id = (await client.post("/v1/tasks", json={"goal": "g"})).json()["task_id"]
    await store.append_event(task_id, "tool_call", {"tool": "echo__echo", "arguments": {"text": "x"}})
    await finish(store, task_id, "42")
    events = parse_sse((await client.get(f"/v1/tasks/{task_id}/events")).text)
    assert len(events) == 5
    for frame in events:
        data = json.loads(frame["data"])
        validator.validate(data)
        assert frame["event"] == data["kind"] and frame["id"] == str(data["seq"])


async def test_events_follow_a_live_task_until_it_ends(client: httpx.AsyncClient, store: MemoryStore) -> None:
    task_id = (await client.post("/v1/tasks", json={"goal": "g"})).json()["task_id"]
    stream = asyncio.create_task(client.get(f"/v1/tasks/{task_id}/events"))
    # The stream can only end once the task is terminal, so finishing it is what completes it.
    await finish(store, task_id, "live")
    r = await stream
    assert [e["event"] for e in parse_sse(r.text)][-2:] == ["final", "state"]


async def test_events_errors_come_before_the_stream(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/tasks/nope/events"), 404, "not_found")
    task_id = (await client.post("/v1/tasks", json={"goal": "g"})).json()["task_id"]
    bad = await client.get(f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": "abc"})
    assert_problem(bad, 422, "invalid_input")


# -- servers, health --------------------------------------------------------------------


async def test_servers_lists_the_pool(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/servers")
    assert r.status_code == 200
    assert [(s["name"], s["state"], s["tools"]) for s in r.json()] == [
        ("echo", "ready", ["echo"]),
        ("files", "ready", ["read"]),
    ]


async def test_health_and_readiness(client: httpx.AsyncClient, store: MemoryStore) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    await store.close()
    assert_problem(await client.get("/readyz"), 503, "unavailable")
    assert (await client.get("/healthz")).status_code == 200


async def test_unknown_route_and_wrong_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v2/nothing"), 404, "not_found")
    assert_problem(await client.delete("/v1/tasks"), 405, "method_not_allowed")


async def test_openapi_document_is_3_1_and_covers_every_route(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/cancel",
        "/v1/tasks/{task_id}/input",
        "/v1/tasks/{task_id}/events",
        "/v1/servers",
        "/v1/audit",
        "/healthz",
        "/readyz",
    }
    assert {"Task", "TaskSpec", "TaskPage", "TaskEvent", "ServerInfo", "ExposedCallPage", "Problem"} <= set(
        doc["components"]["schemas"]
    )


# -- auth and limits ------------------------------------------------------------------------


@pytest.fixture
def secured(service: TaskService) -> Iterator[httpx.AsyncClient]:
    tokens = {"ci": {"token_env": "CI_TOKEN", "limits": {"max_in_flight": 1}}}
    app = http_app(service, principals_with(tokens, {"CI_TOKEN": TOKEN}))
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


async def test_with_the_token_requests_pass_and_probes_never_need_it(secured: httpx.AsyncClient) -> None:
    async with secured:
        assert_problem(await secured.get("/v1/tasks"), 401, "unauthenticated")
        ok = await secured.post("/v1/tasks", json={"goal": "x"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 202
        assert ok.json()["principal"] == "ci"
        assert (await secured.get("/healthz")).status_code == 200
        assert (await secured.get("/readyz")).status_code == 200
        doc = (await secured.get("/openapi.json", headers={"Authorization": f"bearer {TOKEN}"})).json()
        assert doc["security"] == [{"bearer": []}]


async def test_the_audit_shows_a_principal_its_own_calls_and_an_admin_everyone_s(
    secured: httpx.AsyncClient, client: httpx.AsyncClient, store: MemoryStore
) -> None:
    for i, (who, server) in enumerate([("ci", "echo"), ("local", "echo"), ("ci", "files")]):
        await store.record_call(
            ExposedCall(principal=who, server=server, kind="tool", name=f"t{i}", outcome="ok", duration_ms=1)
        )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with secured:
        own = (await secured.get("/v1/audit", headers=auth)).json()
        echo = (await secured.get("/v1/audit?server=echo", headers=auth)).json()
        assert_problem(await secured.get("/v1/audit?server=nope", headers=auth), 404, "not_found")
        assert_problem(await secured.get("/v1/audit?limit=0", headers=auth), 422, "invalid_input")
    assert [c["name"] for c in own["calls"]] == ["t2", "t0"] and own["next_cursor"] is None
    assert [c["name"] for c in echo["calls"]] == ["t0"]
    first = (await client.get("/v1/audit?limit=2")).json()
    rest = (await client.get(f"/v1/audit?cursor={first['next_cursor']}")).json()
    assert [c["name"] for c in first["calls"] + rest["calls"]] == ["t2", "t1", "t0"]


async def test_over_a_limit_is_429_with_retry_after(secured: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with secured:
        assert (await secured.post("/v1/tasks", json={"goal": "a"}, headers=auth)).status_code == 202
        r = await secured.post("/v1/tasks", json={"goal": "b"}, headers=auth)
    body = assert_problem(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) == body["retry_after_s"] >= 1


# -- failures after the fact, and bugs --------------------------------------------------------


class StoreThatDiesMidStream(CountingStore):
    """Answers the pre-stream check, then loses its database while the stream is being served."""

    async def events(self, task_id: str, after_seq: int = 0, limit: int = 1000) -> list[TaskEvent]:
        events = await super().events(task_id, after_seq, limit)
        if self.event_reads > 1:
            raise Unavailable("The task store cannot be reached; retry later.")
        return events


async def test_a_failure_after_the_stream_started_ends_it_with_a_problem_event(
    enqueuer: RecordingEnqueuer,
) -> None:
    store = StoreThatDiesMidStream()
    service = make_service(store, enqueuer)
    task = await service.submit({"goal": "g"}, by=LOCAL)
    transport = httpx.ASGITransport(app=http_app(service))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        r = await c.get(f"/v1/tasks/{task.id}/events")
    assert r.status_code == 200
    last = parse_sse(r.text)[-1]
    assert last["event"] == "problem"
    problem = json.loads(last["data"])
    assert (problem["status"], problem["kind"], problem["type"]) == (
        503,
        "unavailable",
        "urn:opspawn:problem:unavailable",
    )


async def test_a_bug_is_a_500_problem_without_the_trace(enqueuer: RecordingEnqueuer) -> None:
    service = make_service(BrokenStore(), enqueuer)
    transport = httpx.ASGITransport(app=http_app(service), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        r = await c.get("/v1/tasks/abc")
    body = assert_problem(r, 500, "internal")
    assert "secret" not in r.text
    assert "Traceback" not in r.text
    assert body["detail"]


async def test_a_quiet_event_stream_sends_keepalive_comments(service: TaskService) -> None:
    """Proxies cut idle streams: while a task is quiet the stream carries SSE comments.

    Served by a real uvicorn: httpx's ASGI transport buffers whole bodies, so it cannot show a
    stream that only ends when the test acts on what it has read."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # connections wait in the backlog until uvicorn accepts them
        port = sock.getsockname()[1]
        config = uvicorn.Config(http_app(service, port=port, sse_heartbeat_s=0.01), log_level="warning")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                task_id = (await http.post("/v1/tasks", json={"goal": "g"})).json()["task_id"]
                seen: list[str] = []
                async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
                    async for line in response.aiter_lines():
                        seen.append(line)
                        if line == ": keepalive" and seen.count(line) == 1:
                            await service.cancel(task_id, by=LOCAL)  # the stream ends with the task
        finally:
            server.should_exit = True
            await serving
    assert ": keepalive" in seen
    assert [e["event"] for e in parse_sse("\n".join(seen)) if "event" in e][-1] == "state"


async def test_a_repeated_submit_with_an_idempotency_key_answers_the_first_task(
    client: httpx.AsyncClient, enqueuer: RecordingEnqueuer
) -> None:
    keyed = {"Idempotency-Key": "k:1"}
    first = await client.post("/v1/tasks", json={"goal": "echo hi"}, headers=keyed)
    again = await client.post("/v1/tasks", json={"goal": "echo hi"}, headers=keyed)
    assert first.status_code == again.status_code == 202
    assert again.json()["task_id"] == first.json()["task_id"] and len(enqueuer.ids) == 1
    assert again.headers["location"] == first.headers["location"]
    other = await client.post("/v1/tasks", json={"goal": "echo bye"}, headers=keyed)
    assert assert_problem(other, 409, "conflict")["fields"] == ["goal"]
    bad = await client.post("/v1/tasks", json={"goal": "echo hi"}, headers={"Idempotency-Key": "a b"})
    assert_problem(bad, 422, "invalid_input")
