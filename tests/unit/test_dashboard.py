"""The dashboard's doors, against a real ``Runtime.serve_http`` on a free port (the browser test
in tests/e2e drives the pages themselves): signing in puts the token in an HttpOnly,
SameSite=Strict cookie that the guard accepts under /ui only; a dashboard action needs this
server's own Origin; pages are scoped by the principal like the REST routes; the task list
filters by status and searches goals; the timeline streams rendered rows over SSE and ends; a
bad request renders its message; each row's timing; the script and styles ship in the package.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from opspawn_mcp.http_guard import DASHBOARD_COOKIE
from opspawn_mcp.models import EventKind, ExposedCall, TaskEvent
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from opspawn_mcp.ui.render import Durations
from tests.support.service_kit import WARNING, finish
from tests.unit.test_gateway import BASE, assert_problem, http_app, parse_sse
from tests.unit.test_http_guard import ALICE, BOB, ENV, TOKENS, serving

NO_SERVERS = {"goal": "x", "servers": []}


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Alice's and Bob's tokens in the process environment, where ``serve_http`` reads them."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return ENV


@pytest.fixture
async def in_process(service: TaskService) -> AsyncIterator[httpx.AsyncClient]:
    """The app over a service with no worker, so each task keeps the status the test gives it."""
    transport = httpx.ASGITransport(app=http_app(service))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def sign_in(http: httpx.AsyncClient, base: str, token: str) -> httpx.Response:
    return await http.post("/ui/login?next=/ui/servers", json={"token": token}, headers={"origin": base})


def cookie(token: str) -> dict[str, str]:
    return {"cookie": f"{DASHBOARD_COOKIE}={token}"}


async def submit(http: httpx.AsyncClient, token: str | None, **spec: Any) -> str:
    headers = bearer(token) if token else {}
    r = await http.post("/v1/tasks", json={**NO_SERVERS, **spec}, headers=headers)
    assert r.status_code == 202, r.text
    task_id: str = r.json()["task_id"]
    return task_id


# -- without tokens: the local user -------------------------------------------------------


async def test_without_tokens_the_dashboard_is_the_local_users_with_strict_headers() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        task_id = await submit(http, None, goal="echo from the dashboard test")
        page = await http.get("/ui")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert 'signed in as <b id="principal">local</b>' in page.text
        assert f'href="/ui/tasks/{task_id}"' in page.text
        assert "echo from the dashboard test" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["cache-control"] == "no-store"
        # No sign-in needed, so the sign-in page sends you to the tasks.
        r = await http.get("/ui/login", follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, "/ui")


async def test_a_task_page_shows_its_summary_and_timeline() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        task_id = await submit(http, None, goal="<b>not markup</b>")
        page = await http.get(f"/ui/tasks/{task_id}")
        assert page.status_code == 200
        assert "&lt;b&gt;not markup&lt;/b&gt;" in page.text  # goals are text, escaped
        assert 'id="event-1"' in page.text  # the queued state event
        assert 'id="task-status"' in page.text


async def test_the_dashboard_is_behind_the_host_and_origin_checks_like_every_path() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        for path in ["/ui", "/ui/servers", "/ui/login", "/ui/static/dashboard.js"]:
            assert_problem(await http.get(path, headers={"host": "evil.example"}), 421, "misdirected_request")
            assert_problem(await http.get(path, headers={"origin": "http://evil.example"}), 403, "forbidden")
        form = {"content-type": "application/x-www-form-urlencoded", "origin": base}
        refused = await http.post("/ui/tasks", content=b"goal=x", headers=form)
        assert_problem(refused, 415, "unsupported_media_type")


# -- signing in -----------------------------------------------------------------------------


async def test_a_page_without_a_token_redirects_to_sign_in_and_an_action_is_401(
    token_env: dict[str, str],
) -> None:
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        r = await http.get("/ui/tasks/abc?x=1", follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login?next=%2Fui%2Ftasks%2Fabc%3Fx%3D1"
        login = await http.get(r.headers["location"])
        assert login.status_code == 200 and 'id="sign-in"' in login.text
        assert 'data-url="/ui/login?next=/ui/tasks/abc%3Fx%3D1"' in login.text
        refused = await http.post("/ui/tasks/abc/cancel", headers={"origin": base})
        body = assert_problem(refused, 401, "unauthenticated")
        assert "/ui/login" in body["detail"]
        # The script and styles are open: the sign-in page needs them.
        assert (await http.get("/ui/static/dashboard.js")).status_code == 200


async def test_signing_in_sets_an_httponly_strict_cookie_only_the_dashboard_accepts(
    token_env: dict[str, str],
) -> None:
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        wrong = await sign_in(http, base, "not-a-token")
        assert_problem(wrong, 401, "unauthenticated")
        assert "set-cookie" not in wrong.headers
        assert_problem(
            await http.post("/ui/login", json={"tok": ALICE}, headers={"origin": base}), 422, "invalid_input"
        )

        r = await sign_in(http, base, ALICE)
        assert r.status_code == 200, r.text
        assert r.json() == {"principal": "alice", "next": "/ui/servers"}
        attributes = [a.strip().lower() for a in r.headers["set-cookie"].split(";")]
        assert attributes[0] == f"{DASHBOARD_COOKIE}={ALICE}".lower()
        assert {"httponly", "samesite=strict", "path=/ui"} <= set(attributes)
        assert "secure" not in attributes  # plain HTTP on loopback; HTTPS adds it

        page = await http.get("/ui", headers=cookie(ALICE))
        assert page.status_code == 200 and '<b id="principal">alice</b>' in page.text
        assert 'data-action="sign-out"' in page.text
        # The API does not take the cookie: only a bearer header.
        assert_problem(await http.get("/v1/tasks", headers=cookie(ALICE)), 401, "unauthenticated")
        # A foreign "next" never leaves the dashboard.
        away = await http.post(
            "/ui/login?next=//evil.example/ui", json={"token": ALICE}, headers={"origin": base}
        )
        assert away.json()["next"] == "/ui"


async def test_signing_out_clears_the_cookie(token_env: dict[str, str]) -> None:
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        r = await http.post("/ui/logout", headers={**cookie(ALICE), "origin": base})
        assert r.status_code == 200 and r.json() == {"next": "/ui/login"}
        attributes = [a.strip().lower() for a in r.headers["set-cookie"].split(";")]
        assert attributes[0] == f'{DASHBOARD_COOKIE}=""' and "max-age=0" in attributes


@pytest.mark.parametrize("origin", [None, "http://evil.example", "null"])
async def test_a_dashboard_action_without_the_servers_own_origin_is_403(
    token_env: dict[str, str], origin: str | None
) -> None:
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        task_id = await submit(http, ALICE)
        headers = {**cookie(ALICE), **({"origin": origin} if origin else {})}
        for path, body in [(f"/ui/tasks/{task_id}/cancel", None), ("/ui/tasks", NO_SERVERS)]:
            refused = assert_problem(await http.post(path, json=body, headers=headers), 403, "forbidden")
            assert "dashboard's own page" in refused["detail"]
        # A bearer header does not lift the rule either: /ui is for the page, /v1 for scripts.
        assert_problem(await http.post("/ui/tasks", json=NO_SERVERS, headers=bearer(ALICE)), 403, "forbidden")
        assert (await http.get(f"/v1/tasks/{task_id}", headers=bearer(ALICE))).json()["status"] != "cancelled"


async def test_dashboard_actions_from_its_own_page_submit_and_cancel(token_env: dict[str, str]) -> None:
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        own = {**cookie(ALICE), "origin": base}
        made = await http.post("/ui/tasks", json=NO_SERVERS, headers=own)
        assert made.status_code == 201, made.text
        task_id = made.json()["task_id"]
        assert made.json()["url"] == made.headers["location"] == f"/ui/tasks/{task_id}"
        r = await http.post(f"/ui/tasks/{task_id}/cancel", headers=own)
        if r.status_code == 200:
            assert 'class="badge cancelled"' in r.text
        else:  # the embedded worker failed it first (its LLM does not listen)
            assert "can be cancelled" in assert_problem(r, 409, "conflict")["detail"]
        bad = await http.post("/ui/tasks", json={"goal": ""}, headers=own)
        assert_problem(bad, 422, "invalid_input")


async def test_an_answer_names_the_pending_request_or_is_refused_with_why(token_env: dict[str, str]) -> None:
    """The happy path (approve, deny in a real browser) is in tests/e2e/test_dashboard_browser.py."""
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        task_id = await submit(http, ALICE)
        own = {**cookie(ALICE), "origin": base}
        path = f"/ui/tasks/{task_id}/input"
        waiting_for_none = await http.post(path, json={"request_id": "r1", "approve": True}, headers=own)
        assert "waits for no answer" in assert_problem(waiting_for_none, 409, "conflict")["detail"]
        for body in [{"approve": True}, {"request_id": "r1", "approve": "maybe"}, ["r1"]]:
            assert_problem(await http.post(path, json=body, headers=own), 422, "invalid_input")
        bobs = {**cookie(BOB), "origin": base}
        answer = {"request_id": "r1", "approve": True}
        assert_problem(await http.post(path, json=answer, headers=bobs), 404, "not_found")


# -- scoping and filters --------------------------------------------------------------------


async def test_pages_show_only_the_principals_own_tasks(token_env: dict[str, str]) -> None:
    async with serving(TOKENS, token_env) as base, httpx.AsyncClient(base_url=base) as http:
        alices = await submit(http, ALICE, goal="alice's secret goal")
        bobs = cookie(BOB)
        listed = await http.get("/ui", headers=bobs)
        assert listed.status_code == 200 and "secret goal" not in listed.text and alices not in listed.text
        page = await http.get(f"/ui/tasks/{alices}", headers=bobs)
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
        assert "secret goal" not in page.text and "No task with id" in page.text
        assert "List tasks with the task list at /ui to find valid ids." in page.text  # its own words
        assert_problem(await http.get(f"/ui/tasks/{alices}/events", headers=bobs), 404, "not_found")
        cancel = await http.post(f"/ui/tasks/{alices}/cancel", headers={**bobs, "origin": base})
        assert "the task list at /ui" in assert_problem(cancel, 404, "not_found")["detail"]
        assert "secret goal" in (await http.get("/ui", headers=cookie(ALICE))).text


async def test_a_completed_task_with_a_warning_shows_it_on_its_page_and_in_the_list(
    in_process: httpx.AsyncClient, store: MemoryStore
) -> None:
    task_id = await submit(in_process, None, goal="use the failing tool")
    await finish(store, task_id, "done: disk full", warning=WARNING)
    page = (await in_process.get(f"/ui/tasks/{task_id}")).text
    assert f'<p class="warning" id="task-warning">{WARNING}</p>' in page
    rows = (await in_process.get("/ui/tasks/rows")).text
    assert f'<span class="badge warning" title="{WARNING}">warning</span>' in rows


async def test_the_task_list_filters_by_status_and_searches_goals(in_process: httpx.AsyncClient) -> None:
    client = in_process
    deploy = await submit(client, None, goal="Deploy the web app")
    report = await submit(client, None, goal="write the report")
    assert (await client.post(f"/v1/tasks/{report}/cancel")).status_code == 200
    rows = (await client.get("/ui/tasks/rows", params={"q": "deploy"})).text
    assert deploy in rows and report not in rows
    rows = (await client.get("/ui/tasks/rows", params={"status": "cancelled"})).text
    assert report in rows and deploy not in rows
    page = await client.get("/ui", params={"status": "cancelled", "q": "report"})
    assert 'data-refresh="/ui/tasks/rows?status=cancelled&amp;q=report"' in page.text
    assert '<option value="cancelled" selected>' in page.text
    empty = (await client.get("/ui/tasks/rows", params={"q": "nothing like it"})).text
    assert "No task matches these filters." in empty


async def test_a_bad_filter_renders_its_message_with_its_status() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        page = await http.get("/ui", params={"status": "finished"})
        assert page.status_code == 422 and page.headers["content-type"].startswith("text/html")
        assert "Unknown status &#39;finished&#39;; use one of queued" in page.text
        assert_problem(await http.get("/ui/tasks/rows", params={"q": "x" * 300}), 422, "invalid_input")
        missing = await http.get("/ui/nothing-here")
        assert missing.status_code == 404 and "/ui/servers" in missing.text


# -- the timeline, servers, assets ------------------------------------------------------------


async def test_the_timeline_streams_rendered_rows_then_ends(in_process: httpx.AsyncClient) -> None:
    client = in_process
    task_id = await submit(client, None)
    assert (await client.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
    r = await client.get(f"/ui/tasks/{task_id}/events")
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(r.text)
    assert [(f["event"], f.get("id")) for f in frames] == [
        ("item", "1"),
        ("summary", None),
        ("item", "2"),
        ("summary", None),
        ("end", None),
    ]
    assert frames[0]["data"].startswith('<li class="event kind-state" id="event-1"')
    assert 'class="badge cancelled"' in frames[3]["data"]
    resumed = parse_sse(
        (await client.get(f"/ui/tasks/{task_id}/events", headers={"last-event-id": "1"})).text
    )
    assert [f.get("id") for f in resumed if f["event"] == "item"] == ["2"]
    bad = await client.get(f"/ui/tasks/{task_id}/events", params={"after_seq": "-3"})
    assert_problem(bad, 422, "invalid_input")


async def test_the_servers_page_lists_the_servers_the_principal_may_use() -> None:
    async with serving({}) as base, httpx.AsyncClient(base_url=base) as http:
        page = await http.get("/ui/servers")
        assert page.status_code == 200 and 'data-refresh="/ui/servers/rows"' in page.text
        rows = await http.get("/ui/servers/rows")
        assert "No downstream servers you may use" in rows.text


async def test_the_servers_page_shows_the_audit_of_exposed_calls(
    in_process: httpx.AsyncClient, store: MemoryStore
) -> None:
    await store.record_call(
        ExposedCall(
            principal="local", server="echo", kind="prompt", name="greet", outcome="ok", duration_ms=12
        )
    )
    failed = ExposedCall(
        principal="local",
        server="files",
        kind="tool",
        name="read",
        outcome="error",
        error="no luck",
        duration_ms=3,
    )
    await store.record_call(failed)
    page = await in_process.get("/ui/servers")
    assert page.status_code == 200 and 'data-refresh="/ui/servers/calls"' in page.text
    rows = (await in_process.get("/ui/servers/calls")).text
    assert rows.index(f'data-call="{failed.id}"') < rows.index("<code>greet</code>")
    assert '<span class="badge failed">error</span>' in rows and "no luck" in rows and "12 ms" in rows


def test_timings_are_a_tool_result_since_its_call_and_a_model_reply_since_the_event_before() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def event(seq: int, seconds: float, kind: EventKind, **data: Any) -> TaskEvent:
        at = start + timedelta(seconds=seconds)
        return TaskEvent(task_id="t", seq=seq, time=at, kind=kind, data=data)

    durations = Durations()
    took = [
        durations.took(e)
        for e in [
            event(1, 0, "state", status="running"),
            event(2, 1.5, "llm"),
            event(3, 1.6, "tool_call", id="c1"),
            event(4, 2.0, "progress"),
            event(5, 4.1, "tool_result", call_id="c1"),
            event(6, 4.6, "llm"),
            event(7, 4.7, "tool_result", call_id="never-called"),
        ]
    ]
    assert took == ["", "1.50 s", "", "", "2.50 s", "0.50 s", ""]


def test_the_script_and_styles_ship_inside_the_package() -> None:
    static = importlib.resources.files("opspawn_mcp.ui") / "static"
    assert {"dashboard.js", "dashboard.css", "favicon.svg"} <= {p.name for p in static.iterdir()}
    templates = importlib.resources.files("opspawn_mcp.ui") / "templates"
    assert (templates / "task.html").is_file()
