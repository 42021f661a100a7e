"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against a
real ``opspawn-mcp serve`` (embedded worker, SQLite, the bundled example MCP server, tokens
configured) whose LLM is the scripted fake OpenAI server on a thread of this process.

A person signs in with a token, submits a task from the page, and watches its timeline fill
while it runs (a gate in the fake LLM holds the task's last model call until the page is
following it, so the rows that come after can only arrive live, without a reload), until it
is completed with the tool's arguments, result and token usage shown; cancels a slow task (one
the fake LLM holds until the end) from its page; approves and denies a tool call that needs a
person (a server with ``require_approval``) and sees the task go on; sees a task submitted elsewhere appear in the list; searches the list; and reads the
servers page. Screenshots go to ``test-artifacts/ui/``. Every wait is Playwright's own
poll-until-true with the hang guard as its deadline; nothing asserts on durations.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from starlette.requests import Request
from starlette.responses import Response

from tests.security.kit import EXAMPLE_SERVER, Serve, run_serve
from tests.servers.harness import HANG_GUARD_S, REPO_ROOT
from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer
from tests.support.services import require_command

ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"
TOKEN = f"dashboard-{uuid.uuid4().hex}"
GATED, HELD = "gated", "held"
"""Goals with these words wait, after their tool result, until the test opens their gate."""


class GatedLLM(FakeOpenAI):
    """The fake LLM in rule mode, except that for a goal containing a gate's word the model call
    after the tool result waits until that gate is set (in a worker thread: the server keeps
    serving). ``held`` stays shut until the end, so its task runs until it is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = {GATED: threading.Event(), HELD: threading.Event()}

    async def _chat(self, request: Request) -> Response:
        body: dict[str, Any] = json.loads(await request.body())  # Starlette keeps it for super()
        messages = body.get("messages") or []
        goal = next((str(m.get("content")) for m in messages if m.get("role") == "user"), "")
        if messages and messages[-1].get("role") == "tool":
            for word, gate in self.gates.items():
                if word in goal:
                    await anyio.to_thread.run_sync(gate.wait, HANG_GUARD_S)
        return await super()._chat(request)


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeOpenAIServer]:
    fake = GatedLLM()
    with FakeOpenAIServer(fake) as server:
        try:
            yield server
        finally:
            for gate in fake.gates.values():
                gate.set()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, llm: FakeOpenAIServer) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("dashboard")
    opspawn = {
        "llm": {
            "provider": "openai",
            "base_url": llm.base_url,
            "model": "fake-model",
            "timeout_s": 2 * HANG_GUARD_S,
        },
        "server": {"tokens": {"alice": {"token_env": "DASHBOARD_ALICE"}}},
    }
    servers = {"example": EXAMPLE_SERVER, "guarded": {**EXAMPLE_SERVER, "require_approval": ["echo"]}}
    with run_serve(tmp, opspawn, env={"DASHBOARD_ALICE": TOKEN}, mcp_servers=servers) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require_command("chromium")  # Debian's; Playwright downloads no browser here
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, serve: Serve) -> Iterator[Page]:
    """A fresh browser context (no cookie yet); console errors (a CSP refusal, a script
    error, a missing file) fail the test, except the 401 of the wrong token signing in."""
    context = browser.new_context(base_url=serve.http, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(HANG_GUARD_S * 1000)  # clicks and navigations, like expect below
    opened = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "status of 401" not in message.text:
            errors.append(message.text)

    opened.on("console", on_console)
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    expect.set_options(timeout=HANG_GUARD_S * 1000)
    try:
        yield opened
        assert errors == []
    finally:
        context.close()


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Page) -> None:
    page.goto("/ui")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui$"))
    shot(page, "01-sign-in")
    page.fill("#token", "wrong token")
    page.click("#sign-in button")
    expect(page.locator("#flash")).to_contain_text("not one this server accepts")
    page.fill("#token", TOKEN)
    page.click("#sign-in button")
    expect(page.locator("#principal")).to_have_text("alice")


def submit_from_the_page(page: Page, goal: str) -> str:
    page.goto("/ui")
    page.fill("#goal", goal)
    page.click("#new-task button")
    page.wait_for_url("**/ui/tasks/*")
    return page.url.rsplit("/", 1)[1]


def submit_by_rest(serve: Serve, spec: dict[str, Any]) -> str:
    r = httpx.post(f"{serve.http}/v1/tasks", json=spec, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["task_id"]
    return task_id


def until_waiting_for_input(serve: Serve, task_id: str) -> None:
    """Poll REST (bounded by the hang guard) until the task pauses, so the page opens on the pause."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{serve.http}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {TOKEN}"})
        if r.json()["status"] == "input_required":
            return
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not pause for approval within {HANG_GUARD_S} s")


def test_sign_in_submit_and_watch_the_timeline_fill_live_until_completed(
    page: Page, llm: FakeOpenAIServer
) -> None:
    gated = llm.fake
    assert isinstance(gated, GatedLLM)
    sign_in(page)
    submit_from_the_page(page, f"echo {GATED} hello")
    timeline = page.locator("#timeline")
    # The stream is open and the task is held before its last model call: what follows is live.
    expect(timeline).to_have_attribute("data-live", "open")
    expect(timeline.locator(".kind-tool_result")).to_contain_text(f"{GATED} hello")
    expect(page.locator("#task-status")).to_have_text("running")
    page.evaluate("window.samePage = true")
    shot(page, "02-task-running")
    gated.gates[GATED].set()

    expect(page.locator("#task-status")).to_have_text("completed")
    expect(timeline.locator(".kind-final")).to_contain_text(f"done: {GATED} hello")
    expect(timeline).to_have_attribute("data-live", "ended")
    assert page.evaluate("window.samePage") is True  # no reload: it all came over the stream
    call = timeline.locator(".kind-tool_call")
    expect(call).to_contain_text("example__echo")
    expect(call.locator(".arguments")).to_contain_text(f'"text": "{GATED} hello"')
    expect(timeline.locator(".kind-tool_result .took")).to_contain_text(" s")  # since its call
    expect(timeline.locator(".kind-llm .took").last).to_contain_text(" s")  # the model's time
    expect(page.locator("#task-result")).to_have_text(f"done: {GATED} hello")
    tokens = page.locator("#task-tokens").inner_text()
    assert tokens.endswith("total") and not tokens.startswith("0 in"), tokens
    expect(page.locator("button[data-action=cancel]")).to_have_count(0)
    shot(page, "03-task-completed")


def test_cancel_a_slow_task_from_its_page(page: Page) -> None:
    sign_in(page)
    submit_from_the_page(page, f"sleep 1, {HELD}")
    expect(page.locator("#timeline .kind-tool_call")).to_contain_text("example__sleep")
    page.click("button[data-action=cancel]")
    expect(page.locator("#task-status")).to_have_text("cancelled")
    expect(page.locator("#task-error")).to_have_text("cancelled by the client")
    expect(page.locator("#timeline .kind-state").last).to_contain_text("cancelled")
    expect(page.locator("button[data-action=cancel]")).to_have_count(0)
    shot(page, "04-task-cancelled")


def test_the_list_shows_new_tasks_live_and_searches_goals(page: Page, serve: Serve) -> None:
    sign_in(page)
    page.goto("/ui")
    page.evaluate("window.samePage = true")
    marker = f"from elsewhere {uuid.uuid4().hex[:8]}"
    task_id = submit_by_rest(serve, {"goal": f"echo {marker}", "servers": ["example"]})
    row = page.locator(f"#task-rows tr[data-task-id='{task_id}']")
    expect(row).to_contain_text(marker)
    expect(row.locator(".badge")).to_have_text("completed")
    assert page.evaluate("window.samePage") is True
    shot(page, "05-task-list")

    page.fill("input[name=q]", marker)
    page.click(".filters button")
    expect(page.locator("#task-rows tr")).to_have_count(1)
    page.select_option("select[name=status]", "cancelled")
    page.click(".filters button")
    expect(page.locator("#task-rows")).to_contain_text("No task matches these filters.")


@pytest.mark.parametrize("approve", [True, False], ids=["approve", "deny"])
def test_answer_an_approval_request_and_the_task_goes_on(page: Page, serve: Serve, approve: bool) -> None:
    sign_in(page)
    word, done = ("approve", "approved") if approve else ("deny", "denied")
    task_id = submit_by_rest(serve, {"goal": f"echo {word} me", "servers": ["guarded"]})
    until_waiting_for_input(serve, task_id)
    page.goto(f"/ui/tasks/{task_id}")
    panel = page.locator("#approval")
    expect(page.locator("#task-status")).to_have_text("input_required")
    expect(panel).to_contain_text("guarded")
    expect(panel.locator("pre")).to_contain_text(f'"text": "{word} me"')
    shot(page, f"07-approval-{word}-waiting")
    page.fill("#approval-note", f"{done} in the browser test")
    page.click(f"#approval button[data-approve={'true' if approve else 'false'}]")

    expect(page.locator("#task-status")).to_have_text("completed")
    answered = page.locator("#timeline .kind-input_answered")
    expect(answered).to_contain_text(f"{done} by alice: {done} in the browser test")
    expect(panel).to_have_count(0)
    result = page.locator("#task-result")
    if approve:
        expect(result).to_have_text(f"done: {word} me")  # the tool ran and the agent saw its output
    else:
        expect(result).to_contain_text(f"{done} in the browser test")  # the agent was told why not
    shot(page, f"08-approval-{word}-answered")


def test_the_servers_page_shows_state_and_tools(page: Page) -> None:
    sign_in(page)
    page.goto("/ui/servers")
    row = page.locator("tr[data-server=example]")
    expect(row.locator(".badge")).to_have_text("ready")
    for tool in ("echo", "add", "sleep"):
        expect(row.locator(".tools")).to_contain_text(tool)
    shot(page, "06-servers")
