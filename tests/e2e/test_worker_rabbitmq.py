"""Separate ``opspawn-mcp --config F worker`` processes against real RabbitMQ and PostgreSQL.

Each test gets its own RabbitMQ queue (``OPSPAWN_WORKER_QUEUE_NAME``) and its own PostgreSQL
schema, both removed afterwards, so parallel runs on one RabbitMQ/PostgreSQL never collide.
The LLM is the fake OpenAI-compatible server over real HTTP; the worker starts the testing MCP
server over stdio. Waits poll the store with a hang guard only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentkit import INTERRUPTED_MESSAGE
from opspawn_mcp.broker import DramatiqEnqueuer, build_rabbitmq_broker
from opspawn_mcp.config import Config, load_config
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.models import Task, TaskEvent, TaskStatus
from opspawn_mcp.principals import LOCAL
from opspawn_mcp.service import TaskService
from opspawn_mcp.store import open_store
from opspawn_mcp.store.base import TaskStore
from tests.servers.harness import REPO_ROOT, free_port, lines, stdio_config, wait_until
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.metrics import sample, samples
from tests.support.otlp_collector import OtlpCollector
from tests.support.serve import fake_llm_profile
from tests.support.services import POSTGRES_URL, RABBITMQ_URL, delete_queues, drop_schema, require_service
from tests.support.task_waits import states, until, until_a_tool_is_called, until_finished
from tests.support.traces import one, recording, span_id, trace_id

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

READY = "opspawn-mcp worker ready"


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@dataclass
class Deployment:
    config_path: Path
    config: Config
    queue: str
    store: TaskStore
    service: TaskService
    tmp_path: Path

    async def finished(self, task_id: str) -> Task:
        return await until_finished(self.store, task_id)

    async def events(self, task_id: str) -> list[TaskEvent]:
        return await self.store.events(task_id)


class WorkerProcess:
    """``opspawn-mcp --config F worker`` in its own session (so kill -9 takes its children too)."""

    def __init__(self, deployment: Deployment, name: str, env: dict[str, str] | None = None) -> None:
        self.deployment = deployment
        self.log_path = deployment.tmp_path / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = env or {}

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "OPSPAWN_WORKER_QUEUE_NAME": self.deployment.queue}
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "opspawn_mcp.cli",
                    "--config",
                    str(self.deployment.config_path),
                    "worker",
                ],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    async def start(self) -> None:
        self.process = self._spawn()
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited with {process.returncode}:\n{self.log()}")
            return READY in self.log()

        await wait_until(ready, "the worker is ready")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill_hard(self) -> None:
        """SIGKILL the worker and everything it started: no cleanup code runs anywhere."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    async def stop(self) -> int:
        """SIGTERM and wait: the graceful path."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 60)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # leftovers, if the worker leaked any
        return code


@asynccontextmanager
async def deployment(
    tmp_path: Path, base_url: str, mcp_servers: dict[str, Any] | None = None, **worker: Any
) -> AsyncIterator[Deployment]:
    """A config file for the workers (``mcp_servers``, else the testing server as ``t``), with its
    own queue and PostgreSQL schema, and a TaskService publishing to that queue."""
    require_service("rabbitmq")
    require_service("postgres")
    run = uuid.uuid4().hex[:10]
    queue, schema = f"opspawn_test_{run}", f"opspawn_worker_{run}"
    store_url = f"{POSTGRES_URL}?schema={schema}"
    if mcp_servers is None:
        mcp_servers = {"t": stdio_config(tmp_path).model_dump(exclude={"timeout_s", "max_concurrency"})}
    raw = {
        "mcpServers": mcp_servers,
        "opspawn": {
            "store_url": store_url,
            "broker_url": RABBITMQ_URL,
            "llm": fake_llm_profile(base_url, timeout_s=10),
            "worker": {"concurrency": 4, "lease_ttl_s": 2, "max_attempts": 3, **worker},
        },
    }
    config_path = tmp_path / "opspawn.json"
    config_path.write_text(json.dumps(raw), encoding="utf-8")
    config = load_config(config_path)
    store = open_store(store_url)
    await store.start()
    enqueuer = DramatiqEnqueuer(build_rabbitmq_broker(RABBITMQ_URL), queue, owns_broker=True)
    try:
        async with OpsMcpClient(config.mcp_servers) as pool:
            service = TaskService(config, store, enqueuer, pool)
            yield Deployment(config_path, config, queue, store, service, tmp_path)
    finally:
        await enqueuer.aclose()
        await store.close()
        await asyncio.to_thread(delete_queues, queue)
        await drop_schema(schema)


@contextmanager
def _no_leftovers(*workers: WorkerProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for w in workers:
            if w.process is not None and w.process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(w.process.pid, signal.SIGKILL)
                w.process.wait()


@asynccontextmanager
async def _mid_call(
    tmp_path: Path, base_url: str, goal: str
) -> AsyncIterator[tuple[Deployment, WorkerProcess, WorkerProcess, Task]]:
    """A deployment with two workers: ``first`` runs ``goal`` and is in the middle of its first
    tool call; ``second`` is not started yet."""
    async with deployment(tmp_path, base_url) as d:
        first, second = WorkerProcess(d, "first"), WorkerProcess(d, "second")
        with _no_leftovers(first, second):
            await first.start()
            task = await d.service.submit({"goal": goal, "servers": ["t"]}, by=LOCAL)
            await until_a_tool_is_called(d.store, task.id)
            yield d, first, second, task


async def test_a_worker_process_runs_a_task_from_rabbitmq(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    async with deployment(tmp_path, fake.base_url) as d:
        worker = WorkerProcess(d, "a")
        with _no_leftovers(worker):
            await worker.start()
            task = await d.service.submit({"goal": "echo over rabbitmq", "servers": ["t"]}, by=LOCAL)
            done = await d.finished(task.id)
            assert done.status is TaskStatus.COMPLETED, f"{done.error}\n{worker.log()}"
            assert done.result == "done: over rabbitmq"
            assert done.attempts == 1
            events = await d.events(task.id)
            assert states(events) == ["queued", "running", "completed"]
            assert [e.data["name"] for e in events if e.kind == "tool_call"] == ["t__echo"]
            assert await worker.stop() == 0
            assert "shutting down" in worker.log()


async def test_the_trace_context_crosses_rabbitmq_to_a_worker_process_exporting_over_otlp(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    """The producer span is recorded here; the worker process exports its spans to a collector
    here over OTLP/HTTP (configured by the standard variable only), and they continue its trace."""
    with OtlpCollector() as collector, recording() as exporter:
        async with deployment(tmp_path, fake.base_url) as d:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
            worker = WorkerProcess(d, "traced", env=env)
            with _no_leftovers(worker):
                await worker.start()
                task = await d.service.submit({"goal": "echo traced", "servers": ["t"]}, by=LOCAL)
                done = await d.finished(task.id)
                assert done.status is TaskStatus.COMPLETED, f"{done.error}\n{worker.log()}"
                assert await worker.stop() == 0  # flushes the worker's spans
        send = one(list(exporter.get_finished_spans()), f"send {d.queue}")
        spans = collector.spans()
    names = {s.name: s for s in spans}
    process, run = names[f"process {d.queue}"], names["run task"]
    chats = [s for s in spans if s.name == "chat fake-model"]
    assert (process.trace_id, process.parent_span_id) == (trace_id(send), span_id(send))
    assert run.parent_span_id == process.span_id and run.attributes["opspawn.task.id"] == task.id
    assert len(chats) == 2 and {c.parent_span_id for c in chats} == {run.span_id}
    tool, wire = names["execute_tool t.echo"], names["MCP send tools/call echo"]
    assert tool.parent_span_id == run.span_id and wire.parent_span_id == tool.span_id
    assert {s.trace_id for s in [process, run, *chats, tool, wire]} == {trace_id(send)}
    assert {s.service for s in spans} == {"opspawn"}


async def test_a_worker_process_serves_its_own_metrics_behind_the_guard(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    """Its model and downstream counters live in the worker; the task counts come from the store."""
    port = free_port()
    async with deployment(tmp_path, fake.base_url) as d:
        worker = WorkerProcess(d, "metrics", env={"OPSPAWN_TELEMETRY_WORKER_METRICS_PORT": str(port)})
        with _no_leftovers(worker):
            await worker.start()
            assert f"metrics at http://127.0.0.1:{port}/metrics" in worker.log()
            task = await d.service.submit({"goal": "echo counted", "servers": ["t"]}, by=LOCAL)
            done = await d.finished(task.id)
            assert done.status is TaskStatus.COMPLETED, f"{done.error}\n{worker.log()}"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                scrape = await http.get("/metrics")
                foreign = await http.get("/metrics", headers={"Host": "evil.example"})
            assert await worker.stop() == 0
    assert scrape.status_code == 200 and foreign.status_code == 421
    found = samples(scrape.text)
    assert found[sample("opspawn_tasks", state="completed")] == 1
    assert found[sample("opspawn_downstream_calls_total", outcome="ok", server="t")] == 1
    assert (
        found[sample("opspawn_llm_tokens_total", profile="default", type="input")] == done.usage.input_tokens
    )
    assert found[sample("opspawn_task_duration_seconds_count", status="completed")] == 1


async def test_one_worker_process_runs_tasks_concurrently_sharing_one_downstream_server(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with deployment(tmp_path, fake.base_url) as d:
        worker = WorkerProcess(d, "a")
        with _no_leftovers(worker):
            await worker.start()
            tasks = [
                await d.service.submit({"goal": "sleep 2", "servers": ["t"]}, by=LOCAL) for _ in range(4)
            ]
            done = [await d.finished(t.id) for t in tasks]
            assert all(t.status is TaskStatus.COMPLETED for t in done), [t.error for t in done]
            # All four were running at once (on the worker's one event loop): each started
            # before any of them finished. An ordering, not a duration.
            first_finish = min(t.finished_at for t in done if t.finished_at is not None)
            assert all(t.started_at is not None and t.started_at < first_finish for t in done)
            # ...and they shared one pool: the testing server was started once for the process.
            assert len(lines(tmp_path / "pids")) == 1
            assert await worker.stop() == 0


async def test_killed_worker_mid_task_the_next_worker_completes_it_once(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    # A sleep far longer than the test: the kill lands mid-call however slow the machine is
    # between the call's start and the kill (a 3 s sleep could finish first).
    async with _mid_call(tmp_path, fake.base_url, "sleep 60") as (d, first, second, task):
        first.kill_hard()
        assert (await d.store.get(task.id)).status is TaskStatus.RUNNING

        await second.start()
        done = await d.finished(task.id)
        assert done.status is TaskStatus.COMPLETED, f"{done.error}\n{second.log()}"
        # The second attempt resumed from the journal: the model's first answer was not asked
        # again, and the sleep (not annotated idempotent) was not run again: the model was told
        # its effect is unknown.
        assert done.result is not None and done.result.startswith(f"done: {INTERRUPTED_MESSAGE}")
        assert done.attempts == 2
        events = await d.events(task.id)
        assert states(events).count("completed") == 1
        assert [e.kind for e in events].count("final") == 1
        assert [e.kind for e in events].count("tool_call") == 1
        assert sum(1 for line in lines(tmp_path / "cancels") if line.startswith("finished")) == 0
        assert await second.stop() == 0


async def test_sigterm_hands_a_running_task_back_and_another_worker_finishes_it(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    async with _mid_call(tmp_path, fake.base_url, "sleep 30") as (d, first, second, task):
        assert await first.stop() == 0
        handed_back = await d.store.get(task.id)
        assert handed_back.status is TaskStatus.QUEUED, first.log()
        assert states(await d.events(task.id))[-1] == "queued"

        # The next worker takes the re-published message; cancel it to end the test quickly.
        await second.start()
        await until(d.store, task.id, lambda t: t.attempts == 2)
        await d.service.cancel(task.id, by=LOCAL)
        done = await d.finished(task.id)
        assert done.status is TaskStatus.CANCELLED
        assert await second.stop() == 0


def _worker_with(tmp_path: Path, opspawn: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``opspawn-mcp worker`` on a config of only this ``opspawn`` section, to its exit."""
    config_path = tmp_path / "opspawn.json"
    config_path.write_text(json.dumps({"opspawn": opspawn}), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "opspawn_mcp.cli", "--config", str(config_path), "worker"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_worker_refuses_the_embedded_broker(tmp_path: Path) -> None:
    result = _worker_with(tmp_path, {"store_url": "memory://"})
    assert result.returncode == 2
    assert "the embedded broker runs inside `opspawn-mcp serve`" in result.stderr
    assert "set opspawn.broker_url to amqp://" in result.stderr


def test_worker_with_an_unreachable_rabbitmq_says_so_and_exits(tmp_path: Path) -> None:
    url = f"amqp://guest:secret-pass@127.0.0.1:{free_port()}/"
    result = _worker_with(tmp_path, {"store_url": "memory://", "broker_url": url})
    assert result.returncode == 2
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:" in result.stderr
    assert "check that it is running and that opspawn.broker_url is right" in result.stderr
    assert "secret-pass" not in result.stderr
