"""The actor end to end with the embedded broker: real SQLite store, real testing MCP server over
stdio, real OpenAI-compatible HTTP server (the fake, in rule or scripted mode), real TaskService.

Waits poll the store with a hang guard only; nothing asserts on how long anything took.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from opspawn_mcp.agent_factory import MAX_TOOL_ERRORS
from opspawn_mcp.config import Config, HttpServerConfig, ServerConfig, parse_config
from opspawn_mcp.embedded import EmbeddedWorker
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.models import Task, TaskEvent, TaskSpec, TaskStatus
from opspawn_mcp.principals import LOCAL
from opspawn_mcp.service import TaskService
from opspawn_mcp.store import open_store
from opspawn_mcp.store.base import TaskStore
from tests.servers.harness import free_port, lines, stdio_config, wait_until, wait_until_async
from tests.servers.tasks_conformance import spawn_tasks_fixture
from tests.support.callers import task_status
from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, tool_call
from tests.support.serve import fake_llm_profile
from tests.support.task_waits import states, until, until_a_tool_is_called, until_finished


@dataclass
class Stack:
    config: Config
    store: TaskStore
    pool: OpsMcpClient
    worker: EmbeddedWorker
    service: TaskService
    fake: FakeOpenAI
    tmp_path: Path

    async def finished(self, task_id: str) -> Task:
        await until_finished(self.store, task_id)
        await self.worker.join()
        return await self.store.get(task_id)

    async def run(self, spec: dict[str, Any]) -> Task:
        """Submit ``spec`` as the local user; the task once it has ended."""
        task = await self.service.submit(spec, by=LOCAL)
        return await self.finished(task.id)

    async def events(self, task_id: str) -> list[TaskEvent]:
        return await self.store.events(task_id)


UNSET = "OPSPAWN_TEST_UNSET_KEY_VAR"


def make_config(
    tmp_path: Path, base_url: str, *, servers: dict[str, ServerConfig] | None = None, **worker: Any
) -> Config:
    config = parse_config(
        {
            "opspawn": {
                "store_url": f"sqlite+aiosqlite:///{tmp_path / 'opspawn.db'}",
                "broker_url": "embedded",
                "llm": fake_llm_profile(base_url, timeout_s=10),
                # Checked where the config was loaded (the variable was set there), run where it is not.
                "models": {
                    "keyed": {"provider": "openai", "base_url": base_url, "model": "m", "api_key_env": UNSET}
                },
                "worker": {"concurrency": 4, "lease_ttl_s": 2, "max_attempts": 3, **worker},
            }
        },
        "<test>",
        environ={UNSET: "set where the config was checked"},
    )
    config.mcp_servers = servers or {"t": stdio_config(tmp_path)}
    return config


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@asynccontextmanager
async def open_stack(
    tmp_path: Path,
    base_url: str,
    fake: FakeOpenAI,
    *,
    servers: dict[str, ServerConfig] | None = None,
    **worker: Any,
) -> AsyncIterator[Stack]:
    """The composed runtime, opened and closed inside the test's own task (anyio scopes require it)."""
    config = make_config(tmp_path, base_url, servers=servers, **worker)
    store = open_store(config.opspawn.store_url)
    await store.start()
    try:
        async with (
            OpsMcpClient(config.mcp_servers) as pool,
            EmbeddedWorker(config, store, pool) as embedded,
        ):
            service = TaskService(config, store, embedded, pool)
            yield Stack(config, store, pool, embedded, service, fake, tmp_path)
    finally:
        await store.close()


async def test_echo_task_completes_through_the_proxy_with_events(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        done = await stack.run({"goal": "echo hello opspawn", "servers": ["t"]})

        assert done.status is TaskStatus.COMPLETED, done.error
        assert done.result == "done: hello opspawn"
        assert done.attempts == 1
        assert done.steps == 2
        assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
        assert done.lease_owner is None and done.finished_at is not None
        assert done.warning is None  # the answer rests on a successful tool result
        events = await stack.events(done.id)
        assert states(events) == ["queued", "running", "completed"]
        calls = [e for e in events if e.kind == "tool_call"]
        assert [c.data["name"] for c in calls] == ["t__echo"]
        assert calls[0].data["arguments"] == {"text": "hello opspawn"}
        results = [e for e in events if e.kind == "tool_result"]
        assert results[0].data["content"] == "hello opspawn" and results[0].data["is_error"] is False
        assert [e.data["output"] for e in events if e.kind == "final"] == ["done: hello opspawn"]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_redelivered_message_for_a_finished_task_is_a_no_op(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        done = await stack.run({"goal": "echo once", "servers": ["t"]})
        before = await stack.events(done.id)

        for _ in range(3):
            await stack.worker.enqueue(done.id)
        await stack.worker.join()

        after = await stack.store.get(done.id)
        assert after.status is TaskStatus.COMPLETED
        assert after.attempts == done.attempts == 1
        assert after.result == done.result and after.finished_at == done.finished_at
        assert await stack.events(done.id) == before


async def test_a_failing_tool_is_an_observation_the_task_reports(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        stack.fake.script(tool_call("t__fail", message="disk full on /data"))
        done = await stack.run({"goal": "use the failing tool", "servers": ["t"]})

        # The tool error reached the model as data (rule 1 of the fake answers with it); the worker
        # neither crashed nor hid it.
        assert done.status is TaskStatus.COMPLETED, done.error
        assert done.result == "done: The tool t/fail reported an error: disk full on /data"
        results = [e for e in await stack.events(done.id) if e.kind == "tool_result"]
        assert results[0].data["is_error"] is True
        assert "disk full on /data" in results[0].data["content"]
        # ... but the task does not read as a clean success: it says the answer rests on no
        # successful tool result, quoting the error, and the state event says it too.
        assert done.warning == (
            "the agent finished without a successful tool result (last tool error: t__fail: "
            "The tool t/fail reported an error: disk full on /data)"
        )
        assert [e.data.get("reason") for e in await stack.events(done.id) if e.kind == "state"][
            -1
        ] == done.warning


async def test_an_answer_from_the_model_alone_carries_a_warning(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        stack.fake.script("Paris, I believe")
        done = await stack.run({"goal": "capital of France?", "servers": ["t"]})
        assert (done.status, done.result) == (TaskStatus.COMPLETED, "Paris, I believe")
        assert done.warning == (
            "the agent finished without calling a tool, so the answer comes from the model alone"
        )

        done = await stack.run({"goal": "say something", "servers": []})
        assert done.status is TaskStatus.COMPLETED and done.result
        assert done.warning == (
            "the agent had no tools (no downstream MCP server is configured or allowed), so the "
            "answer comes from the model alone"
        )


async def test_the_model_reads_each_failed_call_as_one_message_from_the_pool(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        stack.fake.script(
            tool_call("t__fail", message="disk full on /data"),  # the tool's own isError
            tool_call("t__echo", text="ok"),  # a success between failures: no streak
            tool_call("mcp_proxy_tool", server="elsewhere", tool="echo", arguments={"text": "x"}),
            tool_call("t__echo", text="ok"),
            tool_call("t__crash", code=3),  # the server dies mid-call
            "the end",
        )
        done = await stack.run({"goal": "fail in three ways", "servers": ["t"]})

        assert done.status is TaskStatus.COMPLETED, done.error
        # What the model was sent back, as the fake LLM server received it: one message per
        # failure, no stacked "Tool ... failed: calling ... failed: ..." prefixes.
        messages = stack.fake.requests[-1]["messages"]
        assert [m["content"] for m in messages if m["role"] == "tool"] == [
            "The tool t/fail reported an error: disk full on /data",
            "ok",
            "This task may not use the MCP server 'elsewhere'. Servers it may use: t.",
            "ok",
            "MCP server 't' dropped the connection during the call to 'crash' (Connection closed "
            "(MCP error -32000)). The call may or may not have run; the next call reconnects.",
        ]
        results = [e.data for e in await stack.events(done.id) if e.kind == "tool_result"]
        assert [r["is_error"] for r in results] == [True, False, True, False, True]
        assert results[0]["parts"] == [{"type": "text", "text": "disk full on /data"}]


@pytest.fixture(scope="module")
def tasks_url() -> Iterator[str]:
    with spawn_tasks_fixture() as url:
        yield url


@asynccontextmanager
async def slow_compute_task(
    tmp_path: Path, fake: FakeOpenAIServer, url: str, seconds: float
) -> AsyncIterator[tuple[Stack, Task]]:
    """A stack whose only server is the tasks fixture (per-call timeout 1 s), and a submitted
    task whose agent calls the fixture's task-supporting ``slow_compute`` for ``seconds``."""
    servers: dict[str, ServerConfig] = {"tasks": HttpServerConfig(url=url, protocol="auto", timeout_s=1.0)}
    async with open_stack(tmp_path, fake.base_url, fake.fake, servers=servers) as stack:
        stack.fake.script(tool_call("tasks__slow_compute", seconds=seconds, label="agent"))
        yield stack, await stack.service.submit({"goal": "compute slowly", "servers": ["tasks"]}, by=LOCAL)


async def test_an_agent_gets_the_result_of_a_downstream_task_longer_than_the_call_timeout(
    tmp_path: Path, fake: FakeOpenAIServer, tasks_url: str
) -> None:
    async with slow_compute_task(tmp_path, fake, tasks_url, seconds=2.5) as (stack, task):
        done = await stack.finished(task.id)

        assert done.status is TaskStatus.COMPLETED, done.error
        # The model got the tool's own answer (rule 1 of the fake echoes it), not a timeout.
        assert stack.fake.requests[-1]["messages"][-1]["content"] == "computed 'agent' in 2.5s"
        assert done.result == "done: computed 'agent' in 2.5s"
        events = await stack.events(task.id)
        polled = [e.data["message"] for e in events if e.kind == "progress"]
        assert polled and polled[-1].startswith("downstream task ") and polled[-1].endswith(" completed")


async def test_cancelling_the_task_cancels_its_downstream_task(
    tmp_path: Path, fake: FakeOpenAIServer, tasks_url: str
) -> None:
    async with slow_compute_task(tmp_path, fake, tasks_url, seconds=60) as (stack, task):

        async def polling() -> bool:
            return any(e.kind == "progress" for e in await stack.events(task.id))

        await wait_until_async(polling)
        await stack.service.cancel(task.id, by=LOCAL)
        done = await stack.finished(task.id)

        assert done.status is TaskStatus.CANCELLED
        progress = next(e for e in await stack.events(task.id) if e.kind == "progress")
        downstream_id = progress.data["message"].split()[2]
        assert await task_status(tasks_url, downstream_id) == "cancelled"  # the fixture's own word


async def test_a_tool_that_keeps_failing_fails_the_task_with_its_error(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        # Different arguments each time: identical repeated calls trip the repeated-call guard first.
        for i in range(MAX_TOOL_ERRORS):
            stack.fake.script(tool_call("t__fail", message=f"disk full on /data ({i})"))
        done = await stack.run({"goal": "use the failing tool", "servers": ["t"]})

        assert done.status is TaskStatus.FAILED
        assert done.error is not None
        assert f"{MAX_TOOL_ERRORS} tool calls failed in a row; the last, t__fail, said:" in done.error
        assert "disk full on /data" in done.error
        events = await stack.events(done.id)
        assert [e.kind for e in events].count("tool_result") == MAX_TOOL_ERRORS
        assert states(events)[-1] == "failed" and events[-1].data["reason"] == done.error


async def test_downstream_progress_during_a_long_call_reaches_the_event_log(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        stack.fake.script(tool_call("t__sleep", seconds=0.6))
        done = await stack.run({"goal": "sleep a little", "servers": ["t"]})

        assert done.status is TaskStatus.COMPLETED, done.error
        events = await stack.events(done.id)
        progress = [e for e in events if e.kind == "progress"]
        # The testing server reports 6 steps of 6; the worker's throttle may merge some, but the
        # first and the last report always reach the log, in order, between call and result.
        assert progress, [e.kind for e in events]
        assert {e.data["tool"] for e in progress} == {"t__sleep"}
        assert all(e.data["total"] == 6 and e.data["step"] == 1 for e in progress)
        ticks = [e.data["progress"] for e in progress]
        assert ticks[0] == 1 and ticks[-1] == 6 and ticks == sorted(set(ticks))
        call_seq = next(e.seq for e in events if e.kind == "tool_call")
        result_seq = next(e.seq for e in events if e.kind == "tool_result")
        assert all(call_seq < e.seq < result_seq for e in progress)


async def test_a_downstream_server_crash_is_an_observation_not_a_worker_crash(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        stack.fake.script(tool_call("t__crash", code=3, message="boom"))
        done = await stack.run({"goal": "crash the server", "servers": ["t"]})

        assert done.status is TaskStatus.COMPLETED, done.error
        results = [e for e in await stack.events(done.id) if e.kind == "tool_result"]
        assert results[0].data["is_error"] is True
        # The pool reconnects: the next task uses the server again.
        again = await stack.service.submit({"goal": "echo back again", "servers": ["t"]}, by=LOCAL)
        assert (await stack.finished(again.id)).result == "done: back again"


async def test_a_failing_llm_fails_the_task_with_the_servers_answer(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        stack.fake.fail_next(401, times=1)
        done = await stack.run({"goal": "echo nope", "servers": ["t"]})

        assert done.status is TaskStatus.FAILED
        assert done.error is not None
        assert done.error.startswith("the agent failed: The model server at ")
        assert "HTTP 401" in done.error and "API key" in done.error
        events = await stack.events(done.id)
        assert states(events) == ["queued", "running", "failed"]
        assert events[-1].data["reason"] == done.error


async def test_an_unreachable_llm_fails_the_task_saying_what_to_check(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    async with open_stack(tmp_path, dead, fake.fake) as stack:
        done = await stack.run({"goal": "echo nobody home", "servers": ["t"]})
        assert done.status is TaskStatus.FAILED
        assert done.error is not None
        assert f"Cannot reach the model server at {dead}" in done.error
        assert "check that it is running" in done.error


async def test_missing_api_key_variable_fails_with_the_variable_name(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        done = await stack.run({"goal": "echo secret", "servers": ["t"], "model": {"profile": "keyed"}})
        assert done.status is TaskStatus.FAILED
        assert done.error is not None and "OPSPAWN_TEST_UNSET_KEY_VAR" in done.error
        assert "not set in the worker's environment" in done.error


async def test_the_worker_enforces_the_tasks_tool_call_budget(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        stack.fake.script(tool_call("t__echo", text="one"), tool_call("t__echo", text="two"))
        done = await stack.run({"goal": "echo twice", "servers": ["t"], "budget": {"max_tool_calls": 1}})
        assert done.status is TaskStatus.FAILED
        assert done.error is not None and "max_tool_calls" in done.error
        results = [e for e in await stack.events(done.id) if e.kind == "tool_result"]
        assert len(results) == 1  # the second call did not run


async def test_cancel_stops_a_running_agent_mid_tool_call(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        task = await stack.service.submit({"goal": "sleep 30", "servers": ["t"]}, by=LOCAL)
        await until_a_tool_is_called(stack.store, task.id)
        cancelled = await stack.service.cancel(task.id, by=LOCAL)
        assert cancelled.status is TaskStatus.CANCELLED

        await wait_until(lambda: not stack.worker.runner.running, "the agent stopped")
        await stack.worker.join()
        final = await stack.store.get(task.id)
        assert final.status is TaskStatus.CANCELLED
        assert final.error == "cancelled by the client"
        events = await stack.events(task.id)
        assert states(events) == ["queued", "running", "cancelled"]
        assert not any(e.kind == "final" for e in events)
        # The cancellation crossed the wire: the testing server saw its sleep cancelled.
        await wait_until(
            lambda: any(line.startswith("cancelled") for line in lines(stack.tmp_path / "cancels")),
            "the downstream sleep was cancelled",
        )


async def test_a_cancelled_queued_task_never_starts(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        # Claim the only path in: a task cancelled before its message is processed is refused.
        spec = stack.service.validate({"goal": "echo never", "servers": ["t"]}, by=LOCAL)
        created = await stack.store.create(Task(spec=spec))
        await stack.store.transition(created.id, {TaskStatus.QUEUED}, TaskStatus.CANCELLED, error="cancelled")
        await stack.worker.enqueue(created.id)
        await stack.worker.join()

        task = await stack.store.get(created.id)
        assert task.status is TaskStatus.CANCELLED and task.attempts == 0
        # The queued event create wrote, and the cancellation's own: the worker wrote nothing.
        assert [e.data["status"] for e in await stack.events(created.id)] == ["queued", "cancelled"]


async def test_expired_lease_is_recovered_and_the_task_completes(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        spec = stack.service.validate({"goal": "echo recovered", "servers": ["t"]}, by=LOCAL)
        created = await stack.store.create(Task(spec=spec))
        # A worker that claims the task and then dies: its lease simply runs out.
        assert await stack.store.claim(created.id, "dead-worker", 0.2, 3) is not None

        done = await stack.finished(created.id)
        assert done.status is TaskStatus.COMPLETED, done.error
        assert done.result == "done: recovered"
        assert done.attempts == 2
        assert states(await stack.events(created.id)).count("completed") == 1


async def test_a_task_out_of_attempts_fails_saying_it_gave_up(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake, max_attempts=1) as stack:
        spec = stack.service.validate({"goal": "echo too late", "servers": ["t"]}, by=LOCAL)
        created = await stack.store.create(Task(spec=spec))
        assert await stack.store.claim(created.id, "dead-worker", 0.2, 1) is not None

        done = await stack.finished(created.id)
        assert done.status is TaskStatus.FAILED
        assert done.error is not None
        assert done.error.startswith("gave up after 1 attempts: the worker running it stopped renewing")


async def test_queued_tasks_left_by_a_previous_process_run_on_start(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    config = make_config(tmp_path, fake.base_url)
    store = open_store(config.opspawn.store_url)
    await store.start()
    try:
        # Stored but never enqueued: the previous process died before handling its message.
        spec = TaskSpec(goal="echo survived a restart", servers=["t"])
        created = await store.create(Task(spec=spec))
    finally:
        await store.close()

    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        done = await stack.finished(created.id)
        assert done.status is TaskStatus.COMPLETED
        assert done.result == "done: survived a restart"


async def test_stopping_the_server_hands_a_running_task_back_for_the_next_start(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        task = await stack.service.submit({"goal": "sleep 30", "servers": ["t"]}, by=LOCAL)
        await until_a_tool_is_called(stack.store, task.id)
    # The runtime closed (as `serve` does on SIGTERM): the task is queued again, not lost.
    async with open_stack(tmp_path, fake.base_url, fake.fake) as stack:
        await until(stack.store, task.id, lambda t: t.attempts == 2)
        events = await stack.events(task.id)
        assert {"status": "queued", "reason": "worker shutting down"} in [
            e.data for e in events if e.kind == "state"
        ]
        await stack.service.cancel(task.id, by=LOCAL)
        done = await stack.finished(task.id)
        assert done.status is TaskStatus.CANCELLED
