"""Approval mid-run with the embedded worker: real SQLite store, the counting MCP server over stdio
(it logs every call it receives) and the counting LLM server over HTTP (it logs every request and
the tool results the model was shown), real TaskService.

The task pauses before the gated call with no worker slot held; the answer resumes it from the
journal: approved, the tool runs exactly once and the model is not asked again for the step it
already took; denied or timed out, the model reads why and the tool never runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from opspawn_mcp.config import parse_config
from opspawn_mcp.embedded import EmbeddedWorker
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.models import ApprovalAnswer, Task, TaskStatus
from opspawn_mcp.principals import LOCAL
from opspawn_mcp.service import TaskService
from opspawn_mcp.store import open_store
from opspawn_mcp.store.base import TaskStore
from tests.support.counting_servers import (
    Journal,
    expected_result,
    goal,
    mcp_server_entry,
    spawn_counting_llm,
)
from tests.support.task_waits import states, until, until_finished


@dataclass
class Stack:
    store: TaskStore
    worker: EmbeddedWorker
    service: TaskService
    log: Journal

    async def paused(self, job: str) -> Task:
        task = await self.service.submit({"goal": goal(job, "charge")}, by=LOCAL)
        return await until(self.store, task.id, lambda t: t.status is TaskStatus.INPUT_REQUIRED)


@dataclass(frozen=True)
class Counting:
    """The counting LLM, shared by the module's tests (each uses its own job name), and where it
    and the counting MCP servers log."""

    base_url: str
    folder: Path

    @property
    def log(self) -> Path:
        return self.folder / "log.jsonl"


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Counting]:
    folder = tmp_path_factory.mktemp("counting")
    with spawn_counting_llm(folder / "log.jsonl", folder) as base_url:
        yield Counting(base_url, folder)


@asynccontextmanager
async def open_stack(tmp_path: Path, counting: Counting, **approvals: Any) -> AsyncIterator[Stack]:
    config = parse_config(
        {
            "mcpServers": {"c": mcp_server_entry(counting.log, counting.folder, require_approval=["charge"])},
            "opspawn": {
                "store_url": f"sqlite+aiosqlite:///{tmp_path / 'opspawn.db'}",
                "llm": {
                    "provider": "openai",
                    "base_url": counting.base_url,
                    "model": "fake",
                    "timeout_s": 10,
                },
                "worker": {"concurrency": 2, "lease_ttl_s": 1, "max_attempts": 1},
                "approvals": approvals,
            },
        },
        environ={},
    )
    store = open_store(config.opspawn.store_url)
    await store.start()
    try:
        async with OpsMcpClient(config.mcp_servers) as pool, EmbeddedWorker(config, store, pool) as worker:
            yield Stack(store, worker, TaskService(config, store, worker, pool), Journal(counting.log))
    finally:
        await store.close()


async def test_a_gated_call_pauses_the_task_holding_no_slot_and_an_approval_runs_it_once(
    tmp_path: Path, counting: Counting
) -> None:
    async with open_stack(tmp_path, counting) as stack:
        task = await stack.paused("ok")

        await stack.worker.join()
        assert stack.worker.runner.running == []  # nothing waits in a worker
        assert task.lease_owner is None and task.approval is not None
        assert (task.approval.server, task.approval.tool) == ("c", "charge")
        assert task.approval.arguments == {"job": "ok", "n": 1}
        assert stack.log.tool_calls("ok") == []

        await stack.service.answer(task.id, task.approval.id, ApprovalAnswer(approve=True), by=LOCAL)
        done = await until_finished(stack.store, task.id)

        assert done.status is TaskStatus.COMPLETED, done.error
        assert done.result == expected_result("ok", "charged ok/1")
        assert len(stack.log.tool_calls("ok")) == 1
        assert stack.log.counts("ok") == {"llm0": 1, "tool1": 1, "llm1": 1}  # llm0 replayed, not re-asked
        events = await stack.store.events(task.id)
        assert states(events) == ["queued", "running", "input_required", "queued", "running", "completed"]
        assert done.attempts == 1  # max_attempts=1: the pause did not use the attempt up


async def test_a_denial_reaches_the_model_as_an_observation_and_the_tool_never_runs(
    tmp_path: Path, counting: Counting
) -> None:
    async with open_stack(tmp_path, counting) as stack:
        task = await stack.paused("no")
        assert task.approval is not None

        await stack.service.answer(
            task.id, task.approval.id, ApprovalAnswer(approve=False, note="not this month"), by=LOCAL
        )
        done = await until_finished(stack.store, task.id)

        assert done.status is TaskStatus.COMPLETED, done.error
        assert stack.log.tool_calls("no") == []
        [shown] = stack.log.llm_requests("no", k=1)[0]["tool_results"]
        assert "denied by local: not this month" in shown
        assert done.result == expected_result("no", shown)


async def test_an_unanswered_request_times_out_into_a_denial_the_model_reads(
    tmp_path: Path, counting: Counting
) -> None:
    async with open_stack(tmp_path, counting, timeout_s=0.5) as stack:
        task = await stack.service.submit({"goal": goal("late", "charge")}, by=LOCAL)
        done = await until_finished(stack.store, task.id)

        assert done.status is TaskStatus.COMPLETED, done.error
        assert stack.log.tool_calls("late") == []
        [shown] = stack.log.llm_requests("late", k=1)[0]["tool_results"]
        assert "no answer within 0.5 s" in shown
        assert "input_required" in states(await stack.store.events(task.id))


async def test_a_paused_task_is_cancelled_without_any_worker(tmp_path: Path, counting: Counting) -> None:
    async with open_stack(tmp_path, counting) as stack:
        task = await stack.paused("stop")
        cancelled = await stack.service.cancel(task.id, by=LOCAL)

        assert cancelled.status is TaskStatus.CANCELLED and cancelled.approval is None
        assert stack.log.tool_calls("stop") == []
