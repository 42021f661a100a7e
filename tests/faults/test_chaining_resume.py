"""kill -9 of A's worker while its agent follows a sub-task it delegated to opspawn B (issue #15).

A is a real deployment (``serve`` and ``worker`` processes on RabbitMQ + PostgreSQL) with B as a
downstream MCP server over streamable HTTP; B is a second ``serve`` (SQLite, its own embedded
worker) whose agent calls the counting server's ``record``, held there by the test. A's agent
delegates with ``b__submit_task``. Once B's store shows the sub-task running and held, A's
worker is killed with SIGKILL and a new one started: the resumed run re-sends the same
``submit_task`` with the same idempotency key (the pool counts a delegation as idempotent), B
answers with the task it already runs, and A follows it to its end. A's task completes with
B's answer, B holds exactly one sub-task, and A's model was never asked a step twice. Both
ways of following B: MCP Tasks (``protocol: auto``) and ``get_status`` polls (2025-11-25).

Counts and outcomes only; every wait is a poll bounded by the harness's hang guard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from opspawn_mcp.models import TaskStatus
from opspawn_mcp.store.base import TaskStore
from tests.faults.harness import deployment, poll
from tests.support import counting_servers as counting
from tests.support.fake_openai import FakeOpenAIServer, tool_call
from tests.support.serve import ServerProcess
from tests.support.services import RABBITMQ_URL, require_service, started_store

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

JOB = "sub"


@contextmanager
def opspawn_b(tmp: Path) -> Iterator[tuple[ServerProcess, counting.Journal, counting.Control, str]]:
    """B: ``serve`` over HTTP with the counting LLM and the counting server as ``c``; its
    process, the counting journal and control, and its store's URL."""
    tmp.mkdir()
    journal, control = counting.Journal(tmp / "journal.jsonl"), counting.Control(tmp / "control")
    control.path.mkdir()
    store_url = f"sqlite+aiosqlite:///{tmp / 'b.db'}"
    with counting.spawn_counting_llm(journal.path, control.path) as llm_url:
        config = {
            "mcpServers": {"c": counting.mcp_server_entry(journal.path, control.path, timeout_s=120)},
            "opspawn": {
                "store_url": store_url,
                "llm": {"provider": "openai", "base_url": llm_url, "model": "fake"},
                "chaining": {"instance_id": "b"},
            },
        }
        path = tmp / "b.json"
        path.write_text(json.dumps(config))
        b = ServerProcess(path)
        try:
            yield b, journal, control, store_url
        finally:
            control.release_all()
            b.stop()


async def reattached(store: TaskStore, task_id: str) -> bool:
    """A's second attempt (its second ``running``) has announced a sub-task again."""
    events = await store.events(task_id)
    runs = [i for i, e in enumerate(events) if e.kind == "state" and e.data.get("status") == "running"]
    return len(runs) >= 2 and any(e.kind == "progress" and "subtask" in e.data for e in events[runs[1] :])


@pytest.mark.parametrize("protocol", ["auto", "2025-11-25"], ids=["mcp_tasks", "get_status"])
async def test_a_resumed_worker_reattaches_to_bs_subtask_instead_of_starting_another(
    tmp_path: Path, protocol: str
) -> None:
    require_service("rabbitmq")
    with FakeOpenAIServer() as llm_a, opspawn_b(tmp_path / "b") as (b, b_journal, b_control, b_url):
        b_control.block_tool(JOB, 1)  # B's agent is held in its one tool call until released
        llm_a.fake.script(tool_call("b__submit_task", goal=counting.goal(JOB, "record")))
        downstream: dict[str, Any] = {"b": {"url": b.url, "protocol": protocol, "timeout_s": 30}}
        async with (
            deployment(
                tmp_path / "a",
                broker_url=RABBITMQ_URL,
                mcp_servers=downstream,
                llm_url=llm_a.base_url,
            ) as stack,
            started_store(b_url) as b_store,
        ):
            task_id = await stack.submit("delegate to b", servers=["b"])

            # B's sub-task is running, held in its tool call: A's agent is following it.
            await poll(lambda: b_journal.tool_calls(JOB, 1), "B's agent calling record")
            subtasks = (await b_store.list_tasks()).items
            assert [t.status for t in subtasks] == [TaskStatus.RUNNING], subtasks
            first = stack.workers[0]
            assert (await stack.store.get(task_id)).status is TaskStatus.RUNNING
            first.kill_hard()

            await stack.add_worker()
            await poll(lambda: reattached(stack.store, task_id), "A's resumed run following B's sub-task")
            assert len((await b_store.list_tasks()).items) == 1  # re-attached, nothing new started
            b_control.release_tool(JOB, 1)

            task = (await stack.finished([task_id]))[task_id]
            answer = counting.expected_result(JOB, f"recorded {JOB}/1")
            assert task.status is TaskStatus.COMPLETED, f"{task.error}\n{stack.logs()}"
            assert task.result == f"done: {answer}" and task.attempts == 2
            assert len(llm_a.fake.requests) == 2  # step 1 was not asked again after the crash

            (sub,) = (await b_store.list_tasks()).items
            assert sub.id == subtasks[0].id and sub.status is TaskStatus.COMPLETED
            assert sub.result == answer and sub.spec.goal == counting.goal(JOB, "record")
            assert sub.idempotency_key is not None and sub.idempotency_key.startswith(task_id)
            assert b_journal.counts(JOB) == {"llm0": 1, "tool1": 1, "llm1": 1}  # one run of B's agent
