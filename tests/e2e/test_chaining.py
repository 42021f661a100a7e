"""Chaining end to end: two real opspawn instances, A with B as a downstream MCP server, over
stdio (A starts ``opspawn-mcp serve --stdio`` for B) and over streamable HTTP (B is a second
``serve`` behind a bearer token). An agent in A delegates to B through ``b__submit_task`` (an MCP
task: both sides speak the Tasks extension), B's agent calls the bundled example server, and B's
answer becomes A's; B's task id and progress are in A's event log; cancelling A cancels B's task;
a goal B delegates back to A is refused naming the loop, and no process starts another forever.
Both agents run on the scripted fake OpenAI server (one per instance)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client

from opspawn_mcp.models import Task, TaskStatus
from tests.servers.harness import (
    HANG_GUARD_S,
    REPO_ROOT,
    is_alive,
    opspawn_command,
    wait_until,
    wait_until_async,
)
from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, tool_call
from tests.support.serve import ServerProcess
from tests.support.services import started_store
from tests.support.task_waits import until, until_a_tool_is_called, until_finished

B_TOKEN = "b-token-for-a-0123456789abcdef"


def _write(tmp: Path, name: str, llm_url: str, servers: dict[str, Any], **opspawn: Any) -> Path:
    """An instance's config: its own SQLite store, its own fake LLM, ``name`` as its instance id."""
    config = {
        "mcpServers": servers,
        "opspawn": {
            "store_url": f"sqlite+aiosqlite:///{tmp / name}.db",
            "llm": {"provider": "openai", "base_url": llm_url, "model": "fake"},
            "chaining": {"instance_id": name},
            **opspawn,
        },
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _stdio_opspawn(config: Path, *, tasks: bool = True) -> dict[str, Any]:
    """An opspawn instance as a stdio downstream server (PYTHONPATH: this checkout's code), on
    the 2026-07-28 wire where MCP Tasks exist (``tasks``), else on 2025-11-25."""
    return {
        "command": opspawn_command(),
        "args": ["--config", str(config), "serve", "--stdio"],
        "env": {"PYTHONPATH": str(REPO_ROOT)},
        **({"protocol": "auto"} if tasks else {}),
    }


EXAMPLE = {
    "command": sys.executable,
    "args": ["-m", "opspawn_mcp.example_server"],
    "env": {"PYTHONPATH": str(REPO_ROOT)},
}


@dataclass
class Chain:
    transport: str
    a: ServerProcess
    fake_a: FakeOpenAI
    fake_b: FakeOpenAI
    b_store_url: str
    a_store_url: str


@pytest.fixture(scope="module")
def llms() -> Iterator[tuple[FakeOpenAIServer, FakeOpenAIServer]]:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        yield a, b


def _stop(process: ServerProcess) -> None:
    """Stop ``serve``; every process it started (B, its servers, the A that B started) is gone
    with it, reaped by its parent."""
    family = _descendants(process.proc.pid)
    assert process.stop() == 0, process.log.read_text()
    assert "Traceback" not in process.log.read_text()
    deadline = time.monotonic() + HANG_GUARD_S
    while any(is_alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in family if is_alive(pid)], family


@pytest.fixture(scope="module", params=["stdio", "http", "stdio-2025-11-25"])
def chain(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    llms: tuple[FakeOpenAIServer, FakeOpenAIServer],
) -> Iterator[Chain]:
    tmp = tmp_path_factory.mktemp(f"chain-{request.param}")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    llm_a, llm_b = llms
    a_config = tmp / "a" / "a.json"
    if request.param.startswith("stdio"):
        # Without MCP Tasks (2025-11-25) A's pool follows B's task with get_status instead.
        tasks = request.param == "stdio"
        # With them, B can reach A too (its config starts A over stdio): A -> B -> A is possible.
        b_servers = {"example": EXAMPLE, **({"a": _stdio_opspawn(a_config)} if tasks else {})}
        b_config = _write(tmp / "b", "b", llm_b.base_url, b_servers)
        _write(tmp / "a", "a", llm_a.base_url, {"b": _stdio_opspawn(b_config, tasks=tasks)})
        a = ServerProcess(a_config)
        yield Chain(request.param, a, llm_a.fake, llm_b.fake, _url(tmp, "b"), _url(tmp, "a"))
        _stop(a)
        return
    tokens = {"a": {"token_env": "B_TOKEN"}}
    b_config = _write(tmp / "b", "b", llm_b.base_url, {"example": EXAMPLE}, server={"tokens": tokens})
    b = ServerProcess(b_config, env={"B_TOKEN": B_TOKEN})
    remote = {"url": b.url, "headers": {"Authorization": "Bearer ${B_TOKEN}"}, "protocol": "auto"}
    _write(tmp / "a", "a", llm_a.base_url, {"b": remote})
    a = ServerProcess(a_config, env={"B_TOKEN": B_TOKEN})
    yield Chain("http", a, llm_a.fake, llm_b.fake, _url(tmp, "b"), _url(tmp, "a"))
    _stop(a)
    _stop(b)


def _url(tmp: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{tmp / name / name}.db"


async def _submit(chain: Chain, goal: str) -> str:
    async with httpx.AsyncClient(base_url=chain.a.base) as http:
        created = await http.post("/v1/tasks", json={"goal": goal, "servers": ["b"]})
        assert created.status_code == 202, created.text
        task_id: str = created.json()["task_id"]
        return task_id


async def _finished(chain: Chain, task_id: str) -> dict[str, Any]:
    """A's task over REST once it has ended."""
    async with httpx.AsyncClient(base_url=chain.a.base) as http:
        seen: list[dict[str, Any]] = []

        async def done() -> bool:
            seen.append((await http.get(f"/v1/tasks/{task_id}")).json())
            return seen[-1]["status"] in ("completed", "failed", "cancelled")

        await wait_until_async(done)
        return seen[-1]


async def _events(chain: Chain, task_id: str) -> list[dict[str, Any]]:
    """A finished task's event log over REST (the SSE stream ends with the task)."""
    async with httpx.AsyncClient(base_url=chain.a.base, timeout=30) as http:
        body = (await http.get(f"/v1/tasks/{task_id}/events")).text
    return [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]


def _subtasks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"]["subtask"] for e in events if e["kind"] == "progress" and "subtask" in e["data"]]


async def test_an_agent_in_a_delegates_to_b_and_answers_with_bs_result(chain: Chain) -> None:
    chain.fake_a.script(tool_call("b__submit_task", goal="echo hello from a"))
    task_id = await _submit(chain, "ask b to echo hello")
    task = await _finished(chain, task_id)
    # B's agent called the example server's echo; its answer is the tool result A's agent read.
    assert task["status"] == "completed", task
    assert task["result"] == "done: done: hello from a"
    events = await _events(chain, task_id)
    subtasks = _subtasks(events)
    assert subtasks and all(s == subtasks[0] for s in subtasks)
    assert subtasks[0]["server"] == "b"
    b_task_id = subtasks[0]["task_id"]
    # B's progress (its task's status messages) are A's progress events.
    messages = [e["data"]["message"] for e in events if e["kind"] == "progress"]
    assert any(m.startswith(f"downstream task {b_task_id} ") for m in messages), messages
    assert any("completed" in m for m in messages), messages
    async with started_store(chain.b_store_url) as b_store:
        sub = await b_store.get(b_task_id)
        assert sub.status is TaskStatus.COMPLETED and sub.result == "done: hello from a"
        assert sub.spec.chain == ["a"] and sub.spec.goal == "echo hello from a"
        calls = [e.data["name"] for e in await b_store.events(b_task_id) if e.kind == "tool_call"]
        assert calls == ["example__echo"]


async def test_cancelling_as_task_cancels_its_subtask_in_b(chain: Chain) -> None:
    chain.fake_a.script(tool_call("b__submit_task", goal="sleep 30"))
    task_id = await _submit(chain, "ask b to sleep")
    async with started_store(chain.a_store_url) as a_store, started_store(chain.b_store_url) as b_store:

        async def delegated() -> bool:
            return bool(_subtasks([e.model_dump(mode="json") for e in await a_store.events(task_id)]))

        await wait_until_async(delegated)
        events = [e.model_dump(mode="json") for e in await a_store.events(task_id)]
        b_task_id = _subtasks(events)[0]["task_id"]
        await until_a_tool_is_called(b_store, b_task_id)  # B's agent is in example__sleep
        if chain.transport != "stdio-2025-11-25":
            # Over MCP Tasks, B's status names its newest event: A's progress shows B's steps.

            async def relayed() -> bool:
                return any(
                    e.kind == "progress"
                    and "last event:" in (e.data.get("message") or "")
                    and "example__sleep" in e.data["message"]
                    for e in await a_store.events(task_id)
                )

            await wait_until_async(relayed)
        async with httpx.AsyncClient(base_url=chain.a.base) as http:
            cancelled = await http.post(f"/v1/tasks/{task_id}/cancel")
            assert cancelled.status_code == 200, cancelled.text
        sub: Task = await until_finished(b_store, b_task_id)
        assert sub.status is TaskStatus.CANCELLED
        assert (await until(a_store, task_id, lambda t: t.status.terminal)).status is TaskStatus.CANCELLED


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [d for c in children for d in _descendants(c)]


def _serving(pids: list[int]) -> list[int]:
    def cmdline(pid: int) -> list[str]:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            return []

    return [pid for pid in pids if "serve" in cmdline(pid)]


@pytest.mark.parametrize("chain", ["stdio"], indirect=True)  # only there can B reach A
async def test_a_goal_delegated_back_to_a_is_refused_naming_the_loop(chain: Chain) -> None:
    chain.fake_a.script(tool_call("b__submit_task", goal="ask a to do it"))
    chain.fake_b.script(tool_call("a__submit_task", goal="do it, a"))
    task_id = await _submit(chain, "delegate to b")
    task = await _finished(chain, task_id)
    assert task["status"] == "completed", task
    # B's agent read A's refusal and answered with it; A's agent answered with B's answer.
    assert "loop_detected: This goal was delegated in a loop (a → b → a)" in task["result"]
    # A started B, B started A again (as its server "a"), and that A started nothing: it was
    # started in a loop, so it connects its servers on first use only.
    await wait_until(
        lambda: "started by a chain of opspawn processes that loops (a → b → a)" in chain.a.log.read_text(),
        "the second A's refusal to connect at start",
    )
    opspawns = _serving(_descendants(chain.a.proc.pid))
    assert len(opspawns) == 2, opspawns


@pytest.mark.parametrize("chain", ["stdio"], indirect=True)
async def test_bs_progress_reaches_a_waiting_mcp_client_of_a_as_progress(chain: Chain) -> None:
    chain.fake_a.script(tool_call("b__submit_task", goal="echo over mcp"))
    messages: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(chain.a.url, mode="legacy") as client:
        answer = await client.call_tool(
            "submit_task", {"goal": "ask b", "servers": ["b"], "wait": 45}, progress_callback=on_progress
        )
    assert answer.structured_content is not None, answer
    assert answer.structured_content["result"] == "done: done: over mcp"
    relayed = [m for m in messages if m.startswith("progress ") and '"subtask"' in m]
    assert relayed and "downstream task" in relayed[-1], messages
