"""opspawn's MCP server end to end: real processes, real transports, a real agent run.

``opspawn-mcp serve`` runs as a subprocess (stdio, or HTTP on 127.0.0.1 with a free port) with
the embedded worker, a SQLite store, the testing MCP server as its downstream server and the
fake OpenAI server (another process) as its LLM. The fake's rule mode turns the goal
"echo X" into a call of ``testing__echo`` through opspawn's proxy and the answer "done: X";
"sleep N" calls ``testing__sleep``, which is how a task is kept running to be cancelled.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.types import CallToolResult

from tests.servers.harness import REPO_ROOT, opspawn_command
from tests.support.fake_openai import spawn_fake_openai
from tests.support.mcp_wire import OPSPAWN_TOOLS, initialize_request, tool_call_request
from tests.support.serve import ServerProcess, write_config
from tests.support.services import (
    POSTGRES_URL,
    RABBITMQ_URL,
    delete_queues,
    drop_schema,
    require_service,
)

TOKEN_ENV = "OPSPAWN_E2E_TOKEN"
TOKEN = "e2e-secret-token"


@pytest.fixture(scope="module")
def llm_url() -> Iterator[str]:
    with spawn_fake_openai() as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory, llm_url: str) -> Iterator[ServerProcess]:
    config = write_config(tmp_path_factory.mktemp("http") / "opspawn.json", llm_url)
    server = ServerProcess(config)
    yield server
    code = server.stop()
    log = server.log.read_text()
    assert code == 0, log
    assert "Traceback" not in log, log


def text(result: CallToolResult) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def view(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return result.structured_content


async def poll(client: Client, task_id: str, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """get_status until ``until`` holds; returns every status seen (pytest-timeout bounds it)."""
    seen: list[dict[str, Any]] = []
    while True:
        status = view(await client.call_tool("get_status", {"task_id": task_id}))
        seen.append(status)
        if until(status):
            return seen
        await asyncio.sleep(0.1)


async def check_echo_task_with_progress(client: Client) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    done = view(
        await client.call_tool(
            "submit_task",
            {"goal": "echo hello opspawn", "servers": ["testing"], "wait": 120},
            progress_callback=on_progress,
        )
    )
    assert done["status"] == "completed", done
    assert done["result"] == "done: hello opspawn"
    assert done["progress"]["steps"] >= 1
    assert done["usage"]["total_tokens"] > 0
    assert progress, "no notifications/progress arrived"
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)
    assert any("testing__echo" in (m or "") or "echo" in (m or "") for _, m in progress)
    status = view(await client.call_tool("get_status", {"task_id": done["task_id"]}))
    assert status["status"] == "completed" and status["done"] is True


async def check_bad_input(client: Client) -> None:
    unknown = await client.call_tool("submit_task", {"goal": "echo x", "servers": ["nope"]})
    assert unknown.is_error and "Unknown server(s) 'nope'" in text(unknown)
    empty = await client.call_tool("submit_task", {"goal": ""})
    assert empty.is_error and "goal" in text(empty)
    missing = await client.call_tool("get_status", {"task_id": "no-such-task"})
    assert missing.is_error and "No task with id" in text(missing)


async def wait_for_log(server: ServerProcess, needle: str) -> None:
    """Until the server's stderr log has ``needle`` (pytest-timeout bounds the wait)."""
    while needle not in server.log.read_text():
        assert server.proc.poll() is None, server.log.read_text()
        await asyncio.sleep(0.1)


# -- stdio --------------------------------------------------------------------------------------


async def test_stdio_runs_a_task_through_the_proxy_with_progress(tmp_path: Path, llm_url: str) -> None:
    config = write_config(tmp_path / "opspawn.json", llm_url)
    params = StdioServerParameters(
        command=opspawn_command(), args=["--config", str(config), "serve", "--stdio"], cwd=str(REPO_ROOT)
    )
    async with Client(params) as client:
        assert "submit_task" in (client.instructions or "")
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == OPSPAWN_TOOLS
        await check_echo_task_with_progress(client)
        await check_bad_input(client)
        servers = view(await client.call_tool("list_servers", {}))["servers"]
        assert [s["name"] for s in servers] == ["testing"]


async def test_stdio_list_servers_right_after_connecting_shows_the_example_servers_tools(
    tmp_path: Path, llm_url: str
) -> None:
    """An assistant looks once, at once: serve --stdio answers only after every server's first
    connect attempt (bounded), so the first list_servers is not "connecting, no tools"."""
    config = write_config(tmp_path / "opspawn.json", llm_url)
    document = json.loads(config.read_text())
    document["mcpServers"] = {
        "example": {"command": sys.executable, "args": ["-m", "opspawn_mcp.example_server"]}
    }
    config.write_text(json.dumps(document))
    params = StdioServerParameters(
        command=opspawn_command(),
        args=["serve", "--stdio", "--config", str(config)],
        cwd=str(REPO_ROOT),
        env=dict(os.environ),  # the SDK passes only a few variables by default; PYTHONPATH picks the tree
    )
    async with Client(params) as client:
        (example,) = view(await client.call_tool("list_servers", {}))["servers"]
    assert (example["name"], example["state"]) == ("example", "ready")
    assert {"echo", "add", "word_count", "utc_now", "sleep"} <= set(example["tools"])


async def test_the_claude_desktop_example_works_as_written_with_the_checkout_path(tmp_path: Path) -> None:
    """README: replace /path/to/opspawn with the checkout's absolute path; no config file needed
    (the embedded default, with the bundled example server)."""
    entry = json.loads((REPO_ROOT / "claude_desktop_config.example.json").read_text())["mcpServers"][
        "opspawn"
    ]
    checkout = Path(opspawn_command()).parents[2]  # where `make run` made .venv
    command = entry["command"].replace("/path/to/opspawn", str(checkout))
    assert command == opspawn_command() and entry["args"] == ["serve", "--stdio"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPAWN_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # the embedded default's SQLite goes here
    # An assistant starts it from its own directory, where no opspawn.json is.
    params = StdioServerParameters(command=command, args=entry["args"], cwd=str(tmp_path), env=env)
    async with Client(params) as client:
        (example,) = view(await client.call_tool("list_servers", {}))["servers"]
    assert (example["name"], example["state"]) == ("example", "ready"), example


def test_stdio_writes_only_protocol_messages_to_stdout(tmp_path: Path, llm_url: str) -> None:
    config = write_config(tmp_path / "opspawn.json", llm_url)
    requests = [
        initialize_request("raw"),
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        tool_call_request("list_servers", {}, 3),
    ]
    errlog = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [opspawn_command(), "--config", str(config), "serve", "--stdio"],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errlog,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    for request in requests:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
    answers: dict[int, dict[str, Any]] = {}
    for line in proc.stdout:
        message = json.loads(line)  # every stdout line is a JSON-RPC message, nothing else
        assert message["jsonrpc"] == "2.0"
        if "id" in message:
            answers[message["id"]] = message
        if 3 in answers:
            break
    proc.stdin.close()  # the client going away ends the server
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    errlog.close()
    err = (tmp_path / "stderr.log").read_text()
    assert rest.strip() == ""
    assert answers[1]["result"]["serverInfo"]["name"] == "opspawn"
    assert len(answers[2]["result"]["tools"]) == 6
    assert answers[3]["result"]["structuredContent"]["servers"][0]["name"] == "testing"
    assert "Traceback" not in err


# -- streamable HTTP and SSE ------------------------------------------------------------------


async def test_http_runs_a_task_and_get_status_shows_progress(http_server: ServerProcess) -> None:
    async with Client(http_server.url) as client:
        task = view(await client.call_tool("submit_task", {"goal": "echo over http", "servers": ["testing"]}))
        assert task["status"] in ("queued", "running")
        seen = await poll(client, task["task_id"], lambda s: s["done"])
        final = seen[-1]
        assert final["status"] == "completed", final
        assert final["result"] == "done: over http"
        assert final["progress"]["steps"] >= 1
        assert final["started_at"] and final["finished_at"]
        events = await client.read_resource(f"opspawn://tasks/{task['task_id']}/events")
        log = json.loads(events.contents[0].text)  # type: ignore[union-attr]
        assert log[0]["kind"] == "state" and log[-1]["seq"] == len(log)
        assert any(e["kind"] == "tool_call" for e in log)
        await check_bad_input(client)
        await check_echo_task_with_progress(client)  # notifications/progress over the HTTP stream


async def test_http_cancels_a_running_task(http_server: ServerProcess) -> None:
    async with Client(http_server.url) as client:
        task = view(await client.call_tool("submit_task", {"goal": "sleep 30", "servers": ["testing"]}))
        await poll(client, task["task_id"], lambda s: s["status"] == "running")
        cancelled = view(await client.call_tool("cancel_task", {"task_id": task["task_id"]}))
        assert cancelled["status"] == "cancelled" and cancelled["done"] is True
        # The worker notices within a step and stops the agent, writing nothing more to the task.
        await wait_for_log(http_server, f"task {task['task_id']}: agent stopped (cancelled)")
        events = await client.read_resource(f"opspawn://tasks/{task['task_id']}/events")
        log = json.loads(events.contents[0].text)  # type: ignore[union-attr]
        assert log[-1]["kind"] == "state" and log[-1]["data"]["status"] == "cancelled"
        listed = view(await client.call_tool("list_tasks", {"status": "cancelled"}))
        assert task["task_id"] in [t["task_id"] for t in listed["tasks"]]
        again = view(await client.call_tool("get_status", {"task_id": task["task_id"]}))
        assert again["status"] == "cancelled"
        conflict = await client.call_tool("cancel_task", {"task_id": task["task_id"]})
        assert not conflict.is_error  # cancelling a cancelled task is harmless


async def test_sse_transport_serves_the_same_tools(http_server: ServerProcess) -> None:
    async with Client(sse_client(f"{http_server.base}/sse")) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "submit_task" in names
        # The runtime connects to its downstream servers in the background after start.
        while True:
            servers = view(await client.call_tool("list_servers", {}))["servers"]
            assert servers[0]["name"] == "testing" and servers[0]["state"] != "unavailable", servers
            if servers[0]["state"] == "ready":
                break
            await asyncio.sleep(0.1)
        assert "echo" in servers[0]["tools"] and servers[0]["tool_count"] == len(servers[0]["tools"])


def test_dns_rebinding_hosts_are_refused(http_server: ServerProcess) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Host": "evil.example", "Accept": "application/json, text/event-stream"}
    response = httpx.post(http_server.url, json=body, headers=headers)
    assert response.status_code == 421
    origin = {"Origin": "http://evil.example", "Accept": "application/json, text/event-stream"}
    assert httpx.post(http_server.url, json=body, headers=origin).status_code == 403


# -- the CLI as an MCP client -----------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [opspawn_command(), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cli_submit_status_servers(http_server: ServerProcess, tmp_path: Path) -> None:
    url = http_server.url
    submitted = run_cli(
        "submit", "echo from the cli", "--server", "testing", "--wait", "120", "--url", url, "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    assert task["status"] == "completed" and task["result"] == "done: from the cli"
    status = run_cli("status", task["task_id"], "--url", url, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["task_id"] == task["task_id"]
    servers = run_cli("servers", "--url", url, "--json")
    assert servers.returncode == 0 and json.loads(servers.stdout)["servers"][0]["name"] == "testing"
    bad = run_cli("status", "nope", "--url", url)
    assert bad.returncode == 2 and "No task with id 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_without_a_server_says_so_in_one_line() -> None:
    from tests.support.fake_openai import free_port

    url = f"http://127.0.0.1:{free_port()}/mcp"
    result = run_cli("servers", "--url", url)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"opspawn-mcp: no opspawn server at {url}: start one with `opspawn-mcp serve`"
    )


# -- security ---------------------------------------------------------------------------------


def test_refuses_to_bind_everywhere_without_a_token(tmp_path: Path, llm_url: str) -> None:
    config = write_config(tmp_path / "opspawn.json", llm_url)
    result = run_cli("--config", str(config), "serve", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert "Refusing to serve on 0.0.0.0 without a token" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_taken_port_is_one_clear_line(http_server: ServerProcess, tmp_path: Path, llm_url: str) -> None:
    config = write_config(tmp_path / "opspawn.json", llm_url)
    port = http_server.base.rsplit(":", 1)[1]
    result = run_cli("--config", str(config), "serve", "--port", port)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"opspawn-mcp: Cannot listen on 127.0.0.1:{port}: Address already in use. Pick another port "
        "with `serve --port P` (or opspawn.server.port, $OPSPAWN_SERVER_PORT), or stop what is using this one."
    )


async def test_a_token_is_required_when_configured(tmp_path: Path, llm_url: str) -> None:
    config = write_config(tmp_path / "opspawn.json", llm_url, auth_token_env=TOKEN_ENV)
    server = ServerProcess(config, env={TOKEN_ENV: TOKEN})
    try:
        accept = {"Accept": "application/json, text/event-stream"}
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with httpx.AsyncClient() as http:
            denied = await http.post(server.url, json=body, headers=accept)
            assert denied.status_code == 401
            assert denied.json()["kind"] == "unauthenticated"
            wrong = await http.post(server.url, json=body, headers={**accept, "Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            sse = await http.get(f"{server.base}/sse")
            assert sse.status_code == 401
            probe = await http.get(f"{server.base}/healthz")  # probes need no token
            assert probe.status_code == 200

        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as authed,
            Client(streamable_http_client(server.url, http_client=authed)) as client,
        ):
            assert view(await client.call_tool("list_servers", {}))["servers"]

        cli = run_cli("--config", str(config), "servers", "--url", server.url, env={TOKEN_ENV: TOKEN})
        assert cli.returncode == 0, cli.stderr
        no_token = run_cli("--config", str(config), "servers", "--url", server.url, env={TOKEN_ENV: "wrong"})
        assert (
            no_token.returncode == 2 and "refused the request (HTTP 401): check the token" in no_token.stderr
        )
    finally:
        assert server.stop() == 0


# -- the distributed deployment: serve publishes to RabbitMQ, a worker process runs the task ----


def test_serve_with_rabbitmq_hands_tasks_to_a_worker_process(tmp_path: Path, llm_url: str) -> None:
    """``serve`` with an ``amqp://`` broker_url runs no agents itself: it publishes the id, and a
    separate ``opspawn-mcp worker`` sharing the PostgreSQL store runs the task."""
    require_service("rabbitmq")
    require_service("postgres")
    run = uuid.uuid4().hex[:10]
    queue, schema = f"opspawn_mcp_test_{run}", f"opspawn_mcp_{run}"
    config = write_config(tmp_path / "opspawn.json", llm_url)
    raw = json.loads(config.read_text())
    raw["opspawn"]["store_url"] = f"{POSTGRES_URL}?schema={schema}"
    raw["opspawn"]["broker_url"] = RABBITMQ_URL
    config.write_text(json.dumps(raw))
    env = {"OPSPAWN_WORKER_QUEUE_NAME": queue}
    worker_log = tmp_path / "worker.log"
    server: ServerProcess | None = None
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [opspawn_command(), "--config", str(config), "worker"],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
        )
    try:
        while "opspawn-mcp worker ready" not in worker_log.read_text():
            assert worker.poll() is None, worker_log.read_text()
            time.sleep(0.1)
        server = ServerProcess(config, env=env)
        submitted = run_cli(
            "submit",
            "echo via rabbitmq",
            "--server",
            "testing",
            "--wait",
            "120",
            "--url",
            server.url,
            "--json",
        )
        assert submitted.returncode == 0, submitted.stderr
        task = json.loads(submitted.stdout)
        assert task["status"] == "completed" and task["result"] == "done: via rabbitmq"
        done_line = f"task {task['task_id']} completed"
        assert done_line in worker_log.read_text()  # the worker process ran it...
        assert done_line not in server.log.read_text()  # ...not the server
    finally:
        if server is not None:
            assert server.stop() == 0, server.log.read_text()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        delete_queues(queue)
        asyncio.run(drop_schema(schema))
