"""Approval mid-run on a real ``opspawn-mcp serve`` (uvicorn, embedded worker, SQLite): an MCP
client submits, sees the task wait as ``input_required`` with its request in ``get_status``, and a
person answers through another door (the ``opspawn-mcp approve`` CLI, REST ``POST .../input``).

The downstream server and the LLM are the counting servers (tests/support/counting_servers.py):
they log every tool call and every model request with the tool results the model was shown, so
the test sees the gated tool never run before approval, run once after it, and a denial reach the
model. Waits poll with the hang guard only; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.servers.harness import (
    HANG_GUARD_S,
    REPO_ROOT,
    free_port,
    opspawn_process,
    wait_until_async,
    wait_until_serving,
)
from tests.support.counting_servers import (
    Journal,
    expected_result,
    goal,
    mcp_server_entry,
    spawn_counting_llm,
)

TOKEN = "approvals-e2e-token"
TOKEN_ENV = "OPSPAWN_APPROVALS_E2E_TOKEN"


@dataclass(frozen=True)
class Serve:
    http: str
    config: Path
    log: Journal

    @property
    def mcp(self) -> str:
        return f"{self.http}/mcp"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("approvals")
    journal = tmp / "log.jsonl"
    port = free_port()
    with spawn_counting_llm(journal, tmp) as llm_url:
        config = {
            "mcpServers": {"c": mcp_server_entry(journal, tmp, require_approval=["charge"])},
            "opspawn": {
                "store_url": f"sqlite+aiosqlite:///{tmp / 'opspawn.db'}",
                "broker_url": "embedded",
                "llm": {"provider": "openai", "base_url": llm_url, "model": "fake", "timeout_s": 30},
                "server": {"host": "127.0.0.1", "port": port, "auth_token_env": TOKEN_ENV},
            },
        }
        path = tmp / "opspawn.json"
        path.write_text(json.dumps(config))
        log = tmp / "serve.log"
        with opspawn_process("--config", str(path), "serve", cwd=REPO_ROOT, env=_env(), log=log) as proc:
            http = f"http://127.0.0.1:{port}"
            probe = httpx.Client(base_url=http, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1)
            with probe:
                wait_until_serving(proc, log, lambda: probe.get("/readyz").is_success, (httpx.HTTPError,))
            yield Serve(http=http, config=path, log=Journal(journal))


def _env() -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: TOKEN, "OPSPAWN_TOKEN": TOKEN}


@asynccontextmanager
async def mcp_client(serve: Serve) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(serve.mcp, http_client=http)) as client,
    ):
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def until_status(client: Client, task_id: str, *statuses: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    async def reached() -> bool:
        seen.append(await call(client, "get_status", task_id=task_id))
        return seen[-1]["status"] in statuses

    await wait_until_async(reached)
    return seen[-1]


async def opspawn(serve: Serve, *args: str) -> subprocess.CompletedProcess[str]:
    """One CLI command against the server, as a person at a terminal would type it."""
    command = [sys.executable, "-m", "opspawn_mcp.cli", "--config", str(serve.config), *args]
    return await asyncio.to_thread(
        subprocess.run,
        [*command, "--url", serve.mcp],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


async def test_an_mcp_client_sees_the_request_and_the_cli_approves_it_the_tool_runs_once(
    serve: Serve,
) -> None:
    async with mcp_client(serve) as client:
        task = await call(client, "submit_task", goal=goal("cli", "charge"))
        waiting = await until_status(client, task["task_id"], "input_required", "completed", "failed")

        assert waiting["status"] == "input_required", waiting
        request = waiting["approval"]
        assert (request["server"], request["tool"], request["arguments"]) == (
            "c",
            "charge",
            {"job": "cli", "n": 1},
        )
        assert "approve_task" in waiting["next"]
        assert serve.log.tool_calls("cli") == []

        shown = await opspawn(serve, "status", task["task_id"])
        assert shown.returncode == 0, shown.stderr
        assert f"opspawn-mcp approve {task['task_id']} --request {request['id']}" in shown.stdout
        approved = await opspawn(serve, "approve", task["task_id"], "--request", request["id"], "--json")
        assert approved.returncode == 0, approved.stderr
        assert json.loads(approved.stdout)["status"] in ("queued", "running", "completed")

        done = await until_status(client, task["task_id"], "completed", "failed")
        assert done["status"] == "completed", done
        assert done["result"] == expected_result("cli", "charged cli/1")
        assert serve.log.counts("cli") == {"llm0": 1, "tool1": 1, "llm1": 1}


async def test_a_rest_denial_reaches_the_model_and_the_tool_never_runs(serve: Serve) -> None:
    async with mcp_client(serve) as client:
        task = await call(client, "submit_task", goal=goal("rest", "charge"))
        waiting = await until_status(client, task["task_id"], "input_required", "completed", "failed")
        assert waiting["status"] == "input_required", waiting

        async with httpx.AsyncClient(
            base_url=serve.http, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as rest:
            url = f"/v1/tasks/{task['task_id']}/input"
            stale = await rest.post(url, json={"request_id": "stale", "approve": True})
            assert (
                stale.status_code == 409 and stale.json()["pending_request_id"] == waiting["approval"]["id"]
            )
            denied = await rest.post(
                url, json={"request_id": waiting["approval"]["id"], "approve": False, "note": "over budget"}
            )
            assert denied.status_code == 200, denied.text

        done = await until_status(client, task["task_id"], "completed", "failed")
        assert done["status"] == "completed", done
        assert serve.log.tool_calls("rest") == []
        [shown] = serve.log.llm_requests("rest", k=1)[0]["tool_results"]
        assert "denied by default: over budget" in shown
