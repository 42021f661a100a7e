"""A paused task outlives its worker: with RabbitMQ and PostgreSQL, the worker process that paused
the task is stopped, the answer is given, and a new worker process resumes it from the journal.

The downstream server and the LLM are the counting servers (tests/support/counting_servers.py),
which log every tool call and model request across processes: the gated tool never runs before
the approval and runs exactly once after it, and the model is not asked again for the step that
asked for it. Waits poll the store with a hang guard only.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from opspawn_mcp.broker import DramatiqEnqueuer, build_rabbitmq_broker
from opspawn_mcp.config import load_config
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.models import ApprovalAnswer, TaskStatus
from opspawn_mcp.principals import LOCAL
from opspawn_mcp.service import TaskService
from opspawn_mcp.store import open_store
from tests.e2e.test_worker_rabbitmq import Deployment, WorkerProcess, _no_leftovers
from tests.support.counting_servers import (
    Journal,
    expected_result,
    goal,
    mcp_server_entry,
    spawn_counting_llm,
)
from tests.support.services import POSTGRES_URL, RABBITMQ_URL, delete_queues, drop_schema, require_service
from tests.support.task_waits import states, until, until_finished

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def llm(tmp_path: Path) -> Iterator[str]:
    with spawn_counting_llm(tmp_path / "log.jsonl", tmp_path) as base_url:
        yield base_url


@asynccontextmanager
async def deployment(tmp_path: Path, base_url: str) -> AsyncIterator[Deployment]:
    """A config file with the gated counting server, its own queue and PostgreSQL schema."""
    require_service("rabbitmq")
    require_service("postgres")
    run = uuid.uuid4().hex[:10]
    queue, schema = f"opspawn_test_{run}", f"opspawn_approvals_{run}"
    store_url = f"{POSTGRES_URL}?schema={schema}"
    raw = {
        "mcpServers": {"c": mcp_server_entry(tmp_path / "log.jsonl", tmp_path, require_approval=["charge"])},
        "opspawn": {
            "store_url": store_url,
            "broker_url": RABBITMQ_URL,
            "llm": {"provider": "openai", "base_url": base_url, "model": "fake", "timeout_s": 10},
            "worker": {"concurrency": 2, "lease_ttl_s": 2, "max_attempts": 2},
        },
    }
    config_path = tmp_path / "opspawn.json"
    config_path.write_text(json.dumps(raw), encoding="utf-8")
    config = load_config(config_path)
    store = open_store(store_url)
    await store.start()
    enqueuer = DramatiqEnqueuer(build_rabbitmq_broker(RABBITMQ_URL), queue, owns_broker=True)
    try:
        async with OpsMcpClient({}) as pool:
            yield Deployment(
                config_path, config, queue, store, TaskService(config, store, enqueuer, pool), tmp_path
            )
    finally:
        await enqueuer.aclose()
        await store.close()
        await asyncio.to_thread(delete_queues, queue)
        await drop_schema(schema)


async def test_a_new_worker_process_resumes_an_approved_task_and_runs_the_tool_once(
    tmp_path: Path, llm: str
) -> None:
    log = Journal(tmp_path / "log.jsonl")
    async with deployment(tmp_path, llm) as d:
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
            assert call["pid"] in log.mcp_pids()[1:]  # the new worker's downstream process ran it
            events = await d.store.events(task.id)
            assert states(events) == ["queued", "running", "input_required", "queued", "running", "completed"]
            assert [e.kind for e in events].count("input_answered") == 1
            assert await second.stop() == 0
