"""A paused task outlives its worker: with RabbitMQ and PostgreSQL, the worker process that paused
the task is stopped, the answer is given, and a new worker process resumes it from the journal.

The downstream server and the LLM are the counting servers (tests/support/counting_servers.py),
which log every tool call and model request across processes: the gated tool never runs before
the approval and runs exactly once after it, and the model is not asked again for the step that
asked for it. Waits poll the store with a hang guard only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from opspawn_mcp.models import ApprovalAnswer, TaskStatus
from opspawn_mcp.principals import LOCAL
from tests.e2e.test_worker_rabbitmq import WorkerProcess, _no_leftovers, deployment
from tests.support.counting_servers import (
    Journal,
    expected_result,
    goal,
    mcp_server_entry,
    spawn_counting_llm,
)
from tests.support.task_waits import states, until, until_finished

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def llm(tmp_path: Path) -> Iterator[str]:
    with spawn_counting_llm(tmp_path / "log.jsonl", tmp_path) as base_url:
        yield base_url


async def test_a_new_worker_process_resumes_an_approved_task_and_runs_the_tool_once(
    tmp_path: Path, llm: str
) -> None:
    log = Journal(tmp_path / "log.jsonl")
    gated = {"c": mcp_server_entry(log.path, tmp_path, require_approval=["charge"])}
    async with deployment(tmp_path, llm, gated, max_attempts=2) as d:
        first, second = WorkerProcess(d, "first"), WorkerProcess(d, "second")
        with _no_leftovers(first, second):
            await first.start()
            task = await d.service.submit({"goal": goal("resume", "charge")}, by=LOCAL)
            paused = await until(
                d.store, task.id, lambda t: t.status is TaskStatus.INPUT_REQUIRED or t.status.terminal
            )
            assert paused.status is TaskStatus.INPUT_REQUIRED, first.log()
            assert paused.lease_owner is None
            assert await first.stop() == 0  # nothing of the task is left in the stopped worker
            assert log.tool_calls("resume") == []

            assert paused.approval is not None
            await d.service.answer(task.id, paused.approval.id, ApprovalAnswer(approve=True), by=LOCAL)
            assert log.tool_calls("resume") == []  # no worker runs: the answer only queued it
            await second.start()
            done = await until_finished(d.store, task.id)

            assert done.status is TaskStatus.COMPLETED, f"{done.error}\n{second.log()}"
            assert done.result == expected_result("resume", "charged resume/1")
            assert log.counts("resume") == {"llm0": 1, "tool1": 1, "llm1": 1}
            [call] = log.tool_calls("resume")
            assert second.process is not None
            started_by = {e["pid"]: e["ppid"] for e in log.entries() if e["src"] == "mcp-start"}
            assert started_by[call["pid"]] == second.process.pid  # the new worker's downstream ran it
            events = await d.store.events(task.id)
            assert states(events) == ["queued", "running", "input_required", "queued", "running", "completed"]
            assert [e.kind for e in events].count("input_answered") == 1
            assert await second.stop() == 0
