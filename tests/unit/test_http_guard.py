"""The one HTTP guard, against a real ``Runtime.serve_http`` on a free port: every path of the
app (MCP streamable HTTP and SSE, REST, probes) is refused alike for a foreign Host (421), a
foreign Origin (403), a non-JSON body (415) and a missing token (401, probes excepted); CORS
exists only for the configured origins; the token names the principal the handlers see.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opspawn_mcp.config import parse_config
from opspawn_mcp.http_guard import HttpGuard, host_patterns
from opspawn_mcp.principals import Principals, principal_of
from opspawn_mcp.runtime import Runtime
from opspawn_mcp.store.memory import MemoryStore
from tests.support.mcp_wire import initialize_request
from tests.unit.test_gateway import assert_problem

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789"
ENV = {"ALICE_TOKEN": ALICE, "BOB_TOKEN": BOB}
TOKENS = {"tokens": {"alice": {"token_env": "ALICE_TOKEN"}, "bob": {"token_env": "BOB_TOKEN"}}}
APP_ORIGIN = "https://app.example"
TASK = "0" * 32
INITIALIZE = initialize_request("t")

# Every path the app serves: (method, path, the body a real client sends).
PATHS: list[tuple[str, str, Any]] = [
    ("POST", "/mcp", INITIALIZE),
    ("GET", "/mcp", None),
    ("GET", "/sse", None),
    ("POST", "/messages/?session_id=" + TASK, INITIALIZE),
    ("POST", "/v1/tasks", {"goal": "x"}),
    ("GET", "/v1/tasks", None),
    ("GET", f"/v1/tasks/{TASK}", None),
    ("POST", f"/v1/tasks/{TASK}/cancel", None),
    ("GET", f"/v1/tasks/{TASK}/events", None),
    ("GET", "/v1/servers", None),
    ("GET", "/v1/audit", None),
    ("GET", "/openapi.json", None),
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
]
PROBES = {"/healthz", "/readyz"}


async def whoami(request: Request) -> Response:
    return JSONResponse({"principal": principal_of(request.scope).name})


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The tokens in the process environment, where ``serve_http`` reads them."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    yield ENV


@contextlib.asynccontextmanager
async def serving(server: dict[str, Any], environ: dict[str, str] | None = None) -> AsyncIterator[str]:
    """A real Runtime serving HTTP on a free loopback port, with a ``/whoami`` route; yields the base URL."""
    # An LLM endpoint nobody listens on: the embedded worker fails a task fast, loading nothing.
    llm = {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    raw = {"opspawn": {"store_url": "memory://", "llm": llm, "server": server}}
    config = parse_config(raw, environ=environ or {})
    store = MemoryStore()
    await store.start()
    ready: asyncio.Queue[str] = asyncio.Queue()
    async with Runtime(config, store=store) as runtime:
        extra = [Route("/whoami", whoami)]
        task = asyncio.create_task(
            runtime.serve_http("127.0.0.1", 0, extra_routes=extra, on_ready=ready.put_nowait)
        )
        started = asyncio.create_task(ready.get())
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started.cancel()
            task.result()  # raises why it could not start
        try:
            yield started.result()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await store.close()


async def call(http: httpx.AsyncClient, method: str, path: str, body: Any, **headers: str) -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": {"accept": "application/json, text/event-stream", **headers}}
    if body is not None:
        kwargs["json"] = body
    return await http.request(method, path, **kwargs)


# -- Host, Origin, content type: every path -------------------------------------------------


async def test_a_foreign_host_is_421_everywhere() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        for method, path, body in PATHS:
            assert_problem(
                await call(http, method, path, body, host="evil.example"), 421, "misdirected_request"
            )


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example"])
async def test_a_foreign_origin_is_403_everywhere(origin: str) -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        for method, path, body in PATHS:
            r = await call(http, method, path, body, origin=origin)
            assert_problem(r, 403, "forbidden")
            assert "access-control-allow-origin" not in r.headers


async def test_a_body_that_is_not_json_is_415_on_every_post() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        for method, path, _ in [p for p in PATHS if p[0] == "POST"]:
            for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
                headers = {"content-type": content_type} if content_type else {}
                r = await http.request(method, path, content=b'{"goal": "x"}', headers=headers)
                assert_problem(r, 415, "unsupported_media_type")


async def test_json_with_parameters_and_a_bodyless_post_pass() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        headers = {"content-type": "Application/JSON; charset=utf-8", "origin": base}
        submitted = await http.post("/v1/tasks", content=b'{"goal": "x", "servers": []}', headers=headers)
        assert submitted.status_code == 202, submitted.text
        cancelled = await http.post(f"/v1/tasks/{submitted.json()['task_id']}/cancel")
        assert cancelled.status_code in (200, 409), cancelled.text  # the embedded worker may fail it first
        assert (await http.get("/v1/tasks", headers={"host": "LOCALHOST"})).status_code == 200


async def test_the_mcp_endpoints_pass_the_guard_and_answer() -> None:
    """The SDK's own Host/Origin check is off, so what refuses above is the guard; a good
    request still gets through to MCP."""
    async with serving({}) as base:
        async with Client(f"{base}/mcp") as client:
            assert {t.name for t in (await client.list_tools()).tools} >= {"submit_task", "get_status"}
        async with httpx.AsyncClient(base_url=base) as http:
            r = await call(http, "POST", "/mcp", INITIALIZE, origin=base)
        assert r.status_code == 200, r.text


# -- tokens and principals -------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {ALICE}", ALICE])
async def test_without_a_valid_token_every_path_but_the_probes_is_401(
    token_env: dict[str, str], authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        for method, path, body in PATHS:
            r = await call(http, method, path, body, **headers)
            if path in PROBES:
                assert r.status_code == 200, r.text
            else:
                assert_problem(r, 401, "unauthenticated")
                assert r.headers["www-authenticate"] == 'Bearer realm="opspawn"'


async def test_two_tokens_are_two_principals(token_env: dict[str, str]) -> None:
    alice = {"authorization": f"Bearer {ALICE}"}
    bob = {"authorization": f"bearer {BOB}"}
    async with serving(TOKENS, token_env) as base:
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/whoami", headers=alice)).json() == {"principal": "alice"}
            assert (await http.get("/whoami", headers=bob)).json() == {"principal": "bob"}
            task = (await http.post("/v1/tasks", json={"goal": "x", "servers": []}, headers=alice)).json()
            assert task["principal"] == "alice"
            assert (await http.get(f"/v1/tasks/{task['task_id']}", headers=alice)).status_code == 200
            assert_problem(await http.get(f"/v1/tasks/{task['task_id']}", headers=bob), 404, "not_found")
        async with (
            httpx2.AsyncClient(headers=bob) as bobs,
            Client(streamable_http_client(f"{base}/mcp", http_client=bobs)) as client,
        ):
            result = await client.call_tool("submit_task", {"goal": "y", "servers": []})
        assert result.structured_content is not None
        async with httpx.AsyncClient(base_url=base) as http:
            mine = await http.get(f"/v1/tasks/{result.structured_content['task_id']}", headers=bob)
        assert mine.json()["principal"] == "bob"


# -- CORS ------------------------------------------------------------------------------------


def preflight(
    origin: str, method: str = "POST", headers: str = "authorization, content-type"
) -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": headers,
    }


@pytest.mark.parametrize("path", ["/v1/tasks", "/mcp"])
async def test_cors_preflight_is_answered_for_an_allowed_origin_only(
    token_env: dict[str, str], path: str
) -> None:
    async with (
        serving({**TOKENS, "allowed_origins": [APP_ORIGIN]}, token_env) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        asked = "authorization, content-type, mcp-session-id, mcp-protocol-version, last-event-id"
        ok = await http.options(path, headers=preflight(APP_ORIGIN, headers=asked))  # no token yet
        assert ok.status_code == 200, ok.text
        assert ok.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        other = await http.options(path, headers=preflight("https://other.example"))
        assert_problem(other, 403, "forbidden")
        assert "access-control-allow-origin" not in other.headers
        bad_method = await http.options(path, headers=preflight(APP_ORIGIN, method="PUT"))
        assert_problem(bad_method, 400, "cors_refused")
        answered = await http.get(
            "/v1/tasks", headers={"origin": APP_ORIGIN, "authorization": f"Bearer {ALICE}"}
        )
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "location" in answered.headers["access-control-expose-headers"]
        refused = await http.get("/v1/tasks", headers={"origin": APP_ORIGIN})
        assert_problem(refused, 401, "unauthenticated")
        assert refused.headers["access-control-allow-origin"] == APP_ORIGIN  # so the page can read why


async def test_without_allowed_origins_there_are_no_cors_headers() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        answers = [
            await http.options("/v1/tasks", headers=preflight(base)),
            await http.options("/v1/tasks", headers=preflight(APP_ORIGIN)),
            await http.get("/v1/tasks", headers={"origin": base}),
            await http.post("/v1/tasks", json={"goal": "x", "servers": []}, headers={"origin": base}),
        ]
    assert [r.status_code for r in answers] == [405, 403, 200, 202]
    assert not [r for r in answers if any(h.startswith("access-control-") for h in r.headers)]


# -- unmatched paths and methods -------------------------------------------------------------


async def test_unknown_paths_and_methods_are_problems() -> None:
    unknown = [("GET", "/nope"), ("GET", "/v1/tasks/x/y/z"), ("GET", "/mcp/x"), ("GET", "/v1")]
    wrong_method = [
        ("DELETE", "/v1/tasks"),
        ("GET", "/v1/tasks/x/cancel"),
        ("POST", "/sse"),
        ("POST", "/healthz"),
    ]
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        for method, path in unknown:
            assert_problem(await http.request(method, path), 404, "not_found")
        for method, path in wrong_method:
            assert_problem(await http.request(method, path), 405, "method_not_allowed")


# -- which names and origins count as this server ---------------------------------------------


def guard(host: str, port: int, **lists: list[str]) -> HttpGuard:
    return HttpGuard.for_server(Principals.from_config(parse_config({}, environ={})), host, port, **lists)


def test_loopback_names_on_the_served_port() -> None:
    g = guard("127.0.0.1", 8765)
    assert all(
        g.host_ok(h)
        for h in ["127.0.0.1:8765", "localhost:8765", "[::1]:8765", "localhost", "LocalHost:8765"]
    )
    assert not any(g.host_ok(h) for h in ["localhost:8766", "evil.example:8765", "evil.example", "", None])
    assert g.origin_ok("http://localhost:8765") and g.origin_ok("https://127.0.0.1:8765")
    assert not any(
        g.origin_ok(o) for o in ["http://localhost:9999", "ftp://localhost:8765", "null", "localhost"]
    )


def test_bind_address_wildcard_and_allowed_hosts() -> None:
    assert guard("10.0.0.5", 9000).host_ok("10.0.0.5:9000")
    assert guard("fe80::1", 9000).host_ok("[fe80::1]:9000")
    assert guard("0.0.0.0", 9000).host_ok(f"{socket.gethostname()}:9000")
    assert not guard("127.0.0.1", 9000).host_ok(f"{socket.gethostname()}:9000")
    proxied = guard("127.0.0.1", 9000, allowed_hosts=["ops.example.com", "edge.example.com:8443"])
    assert proxied.host_ok("ops.example.com") and proxied.host_ok("ops.example.com:443")
    assert proxied.host_ok("edge.example.com:8443") and not proxied.host_ok("edge.example.com:8444")
    assert proxied.origin_ok("https://ops.example.com")  # the proxy's own pages are same-origin
    assert "localhost:*" in host_patterns("127.0.0.1", 0)  # port not known yet: any


def test_allowed_origins_are_exact() -> None:
    g = guard("127.0.0.1", 8765, allowed_origins=["https://App.example"])
    assert g.origin_ok("https://app.example")
    assert not g.origin_ok("https://app.example:8443") and not g.origin_ok("http://app.example")
    assert not g.host_ok("app.example")  # an origin allowed to call is not a name this server answers to
