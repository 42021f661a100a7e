"""Rebinding headers and non-JSON bodies are refused at every HTTP path of a real ``serve``.

Pins issue 10's third finding: the REST gateway checked neither Host nor Origin nor Content-Type,
so with the default config (loopback, no token) any web page could submit tasks, and by DNS
rebinding read every task. One ``serve`` runs with that default (no token, no allowed_origins),
and at every route (MCP streamable HTTP and SSE, REST, the OpenAPI document, the probes):

* a ``Host`` that is not this server's is 421, an ``Origin`` that is not this server's is 403;
* a body in a type a page can send cross-origin without a preflight (``text/plain``,
  ``application/x-www-form-urlencoded``, ``multipart/form-data``) is 415 on every POST route;
* every refusal is ``application/problem+json``, no answer carries
  ``access-control-allow-origin``, a refused request changes nothing (no task is created, a
  refused cancel cancels nothing), and an unmatched path is a problem+json 404.

The same requests with this server's own Host, Origin and JSON go through, so the refusals are
the guard's and not a broken route.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.security.kit import Serve, capturing_llm, rest, run_serve
from tests.support.mcp_wire import initialize_request, tool_call_request
from tests.support.serve import fake_llm_profile

MARKER = f"refused-{uuid.uuid4().hex[:12]}"
"""In the goal of every refused submit: no task with it may ever exist."""

INITIALIZE = initialize_request("guard-e2e")
SUBMIT_CALL = tool_call_request("submit_task", {"goal": f"echo {MARKER}"}, 2)


@dataclass(frozen=True)
class Guarded:
    serve: Serve
    task_id: str
    """A task that stays running (sleep 30) so a cancel that got through would show."""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    tmp = tmp_path_factory.mktemp("http-guard")
    with capturing_llm() as llm:
        opspawn = {"llm": fake_llm_profile(llm.base_url)}
        with run_serve(tmp, opspawn) as serve:
            r = httpx.post(
                f"{serve.http}/v1/tasks", json={"goal": "sleep 30", "servers": ["example"]}, timeout=30
            )
            assert r.status_code == 202, r.text
            task_id = r.json()["task_id"]
            yield Guarded(serve, task_id)
            httpx.post(f"{serve.http}/v1/tasks/{task_id}/cancel", timeout=30)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: bytes | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def routes(task_id: str) -> list[Call]:
    """Every route of the HTTP app, each with a body it would accept."""
    spec = json.dumps({"goal": f"echo {MARKER}"}).encode()
    return [
        Call("POST", "/mcp", json.dumps(INITIALIZE).encode()),
        Call("POST", "/mcp", json.dumps(SUBMIT_CALL).encode()),
        Call("GET", "/mcp"),
        Call("GET", "/sse"),
        Call("POST", f"/messages/?session_id={uuid.uuid4().hex}", json.dumps(SUBMIT_CALL).encode()),
        Call("POST", "/v1/tasks", spec),
        Call("GET", "/v1/tasks"),
        Call("GET", f"/v1/tasks/{task_id}"),
        Call("POST", f"/v1/tasks/{task_id}/cancel"),
        Call("POST", f"/v1/tasks/{task_id}/input", json.dumps({"request_id": "r", "approve": True}).encode()),
        Call("GET", f"/v1/tasks/{task_id}/events"),
        Call("GET", "/v1/servers"),
        Call("GET", "/openapi.json"),
        Call("GET", "/healthz"),
        Call("GET", "/readyz"),
        Call("GET", "/no-such-path"),
    ]


def body_routes(task_id: str) -> list[Call]:
    return [c for c in routes(task_id) if c.method == "POST"]


@pytest.fixture
async def client(guarded: Guarded) -> AsyncIterator[httpx.AsyncClient]:
    async with rest(guarded.serve, None) as c:
        yield c


async def _send(client: httpx.AsyncClient, call: Call, headers: dict[str, str]) -> httpx.Response:
    """One request; a stream is closed after its head, so an SSE route that wrongly answered 200
    fails the status assertion instead of hanging the test."""
    base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if call.body is None:
        base.pop("content-type")
    async with client.stream(call.method, call.path, headers={**base, **headers}, content=call.body) as r:
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            await r.aread()
        return r


def _assert_problem(r: httpx.Response, status: int, what: str) -> None:
    assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
    assert r.headers.get("content-type", "").startswith("application/problem+json"), (what, r.headers)
    problem = r.json()
    assert problem["status"] == status and problem.get("title"), (what, problem)
    assert "Traceback" not in r.text


def _assert_no_cors(r: httpx.Response, what: str) -> None:
    assert not [k for k in r.headers if k.lower().startswith("access-control-")], (what, r.headers)


async def _assert_nothing_changed(client: httpx.AsyncClient, task_id: str) -> None:
    r = await client.get("/v1/tasks", params={"limit": 100})
    assert r.status_code == 200, r.text
    goals = [t["spec"]["goal"] for t in r.json()["items"]]
    assert not [g for g in goals if MARKER in g], goals
    r = await client.get(f"/v1/tasks/{task_id}")
    assert r.json()["status"] in ("queued", "running"), r.json()


async def _assert_refused_at_every_path(
    client: httpx.AsyncClient, guarded: Guarded, headers: dict[str, str], status: int
) -> None:
    """Every route answers a request with ``headers`` by a ``status`` problem and no CORS header."""
    for call in routes(guarded.task_id):
        r = await _send(client, call, headers)
        _assert_problem(r, status, f"{call} {headers}")
        _assert_no_cors(r, str(call))


def _hosts(port: int) -> list[str]:
    return [
        "evil.example",
        f"evil.example:{port}",
        f"127.0.0.1.evil.example:{port}",
        f"localhost.evil.example:{port}",
        "127.0.0.2",
        f"[::2]:{port}",
    ]


async def test_a_foreign_host_is_421_at_every_path(guarded: Guarded, client: httpx.AsyncClient) -> None:
    for host in _hosts(guarded.serve.port):
        await _assert_refused_at_every_path(client, guarded, {"host": host}, 421)
    await _assert_nothing_changed(client, guarded.task_id)


def _origins(port: int) -> list[str]:
    return [
        "http://evil.example",
        "https://evil.example",
        f"http://evil.example:{port}",
        f"http://127.0.0.1.evil.example:{port}",
        f"http://localhost:{port}.evil.example",
        "null",
        "file://",
    ]


async def test_a_foreign_origin_is_403_at_every_path(guarded: Guarded, client: httpx.AsyncClient) -> None:
    for origin in _origins(guarded.serve.port):
        await _assert_refused_at_every_path(client, guarded, {"origin": origin}, 403)
        preflight = await client.options(
            "/v1/tasks",
            headers={"origin": origin, "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 403, preflight.text
        _assert_no_cors(preflight, f"OPTIONS /v1/tasks Origin: {origin}")
    await _assert_nothing_changed(client, guarded.task_id)


SIMPLE_TYPES = [
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=----opspawn",
]
"""The types a web page may POST cross-origin without a CORS preflight."""


async def test_a_body_that_is_not_json_is_415_on_every_post_route(
    guarded: Guarded, client: httpx.AsyncClient
) -> None:
    for content_type in [*SIMPLE_TYPES, "application/xml", "application/jsonx"]:
        for call in body_routes(guarded.task_id):
            # The body is JSON text: only its declared type makes it a page's request.
            body = call.body or b'{"reason": "a page said so"}'
            r = await _send(client, Call(call.method, call.path, body), {"content-type": content_type})
            _assert_problem(r, 415, f"{call} content-type: {content_type}")
            _assert_no_cors(r, str(call))
    # A body with no declared type at all is not JSON either.
    r = await client.post(
        "/v1/tasks", content=f'{{"goal": "echo {MARKER}"}}'.encode(), headers={"content-type": ""}
    )
    _assert_problem(r, 415, "POST /v1/tasks with an empty content-type")
    await _assert_nothing_changed(client, guarded.task_id)


async def test_an_unmatched_path_or_method_is_a_problem(guarded: Guarded, client: httpx.AsyncClient) -> None:
    for path in ("/no-such-path", "/v1", "/v1/tasks/a/b/c", "/v2/tasks", "/mcp/extra", "/.env"):
        r = await client.get(path)
        _assert_problem(r, 404, f"GET {path}")
        _assert_no_cors(r, path)
    for method, path in (
        ("DELETE", "/v1/tasks"),
        ("PUT", f"/v1/tasks/{guarded.task_id}"),
        ("POST", "/healthz"),
    ):
        r = await client.request(method, path, json={})
        _assert_problem(r, 405, f"{method} {path}")
    await _assert_nothing_changed(client, guarded.task_id)


async def test_this_servers_own_host_origin_and_json_go_through(
    guarded: Guarded, client: httpx.AsyncClient
) -> None:
    """The control: the refusals above are the guard's, not routes that never worked."""
    port = guarded.serve.port
    for host, origin in ((f"127.0.0.1:{port}", None), (f"localhost:{port}", f"http://localhost:{port}")):
        headers = {"host": host, **({"origin": origin} if origin else {})}
        r = await client.post("/v1/tasks", json={"goal": "echo allowed"}, headers=headers)
        assert r.status_code == 202, r.text
        _assert_no_cors(r, "an allowed submit")
        r = await client.get(f"/v1/tasks/{r.json()['task_id']}", headers=headers)
        assert r.status_code == 200, r.text
        for path in ("/v1/servers", "/openapi.json", "/healthz", "/readyz"):
            r = await client.get(path, headers=headers)
            assert r.status_code == 200, (path, r.text)
            _assert_no_cors(r, path)
        r = await _send(client, Call("POST", "/mcp", json.dumps(INITIALIZE).encode()), headers)
        assert r.status_code == 200, r.text
        _assert_no_cors(r, "POST /mcp")
    r = await client.post(
        "/v1/tasks",
        json={"goal": "echo charset"},
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 202, r.text
