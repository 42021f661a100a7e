"""A real deployment for the fault tests: ``opspawn-mcp serve`` (HTTP, REST door) and N
``opspawn-mcp worker`` processes on RabbitMQ + PostgreSQL, the counting downstream MCP server as
the stdio server ``c``, the counting scripted LLM as the default model profile.

Every run gets its own PostgreSQL schema and RabbitMQ queue (or private instances: see
``services.py``), both removed afterwards. ``Worker.kill_hard`` is kill -9 of the worker's
process group *and* of the downstream processes it started (the MCP SDK starts those in their
own session, so a group kill alone would leave them running). Waits poll with a hang guard;
nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

from opspawn_mcp.models import Task, TaskEvent, TaskStatus
from opspawn_mcp.store import open_store
from opspawn_mcp.store.base import TaskStore
from tests.servers.harness import REPO_ROOT, free_port, opspawn_command, opspawn_process
from tests.support.counting_servers import Control, Journal, mcp_server_entry, spawn_counting_llm
from tests.support.serve import deployment_env
from tests.support.services import POSTGRES_URL, delete_queues, drop_schema, require_service

HANG_GUARD_S = 60.0
"""Deadline of every wait here: only there to turn a hang into a failure, never asserted."""
READY = "opspawn-mcp worker ready"
TERMINAL = frozenset({"completed", "failed", "cancelled"})


async def poll(predicate: Any, what: str, *, interval: float = 0.05, deadline_s: float = HANG_GUARD_S) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that."""
    try:
        with anyio.fail_after(deadline_s):
            while True:
                value = predicate()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return value
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"hang guard: never {what}") from None


class Worker:
    """One ``opspawn-mcp --config F worker`` process, in its own session."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack = stack
        self.name = name
        self.log_path = stack.tmp / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [opspawn_command(), "--config", str(self.stack.config_path), "worker"],
                cwd=REPO_ROOT,
                env=deployment_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    async def start(self) -> Worker:
        self.process = process = self._spawn()

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited with {process.returncode}:\n{self.log()[-4000:]}"
                )
            return READY in self.log()

        await poll(ready, f"worker {self.name} ready")
        return self

    def downstream_pids(self) -> list[int]:
        """The counting MCP server processes this worker started (from their start lines)."""
        if self.process is None:
            return []
        return [
            e["pid"]
            for e in self.stack.journal.entries()
            if e["src"] == "mcp-start" and e.get("ppid") == self.pid
        ]

    def kill_hard(self) -> None:
        """kill -9 the worker, its process group and its downstream servers: no cleanup runs."""
        assert self.process is not None
        children = self.downstream_pids()
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in children:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class Stack:
    tmp: Path
    config_path: Path
    http: str
    journal: Journal
    control: Control
    store: TaskStore
    serve: subprocess.Popen[bytes] | None
    workers: list[Worker] = field(default_factory=list)
    store_url: str = ""
    _names: int = 0

    async def reopen_store(self) -> None:
        """A new engine for the test's own reads (after a PostgreSQL restart killed the old one's
        connections); the old one is closed, whatever state it is in."""
        old, self.store = self.store, open_store(self.store_url)
        with suppress(Exception):
            await old.close()
        await self.store.start()

    # -- processes --

    async def add_worker(self) -> Worker:
        self._names += 1
        worker = Worker(self, str(self._names))
        self.workers.append(worker)
        return await worker.start()

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive()]

    def logs(self) -> str:
        """The tail of every process log, for failure messages."""
        parts = []
        for path in sorted(self.tmp.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # -- the REST door --

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http, timeout=httpx.Timeout(30.0))

    async def submit(self, goal: str, **spec: Any) -> str:
        async with self.client() as client:
            r = await client.post("/v1/tasks", json={"goal": goal, "servers": ["c"], **spec})
        assert r.status_code == 202, f"submit answered {r.status_code}: {r.text}"
        task_id: str = r.json()["task_id"]
        return task_id

    async def servers(self) -> list[dict[str, Any]]:
        async with self.client() as client:
            r = await client.get("/v1/servers")
        assert r.status_code == 200, r.text
        servers: list[dict[str, Any]] = r.json()
        return servers

    # -- the store, read directly --

    async def finished(self, task_ids: Iterable[str], *, stall_s: float = HANG_GUARD_S) -> dict[str, Task]:
        """Poll the store until every task is terminal; the finished tasks by id.

        The guard is on progress, not on the whole wait: it fails only when ``stall_s`` pass with
        no further task finishing, so a loaded machine makes a long batch slower, never red."""
        pending, done = set(task_ids), {}

        async def one_more(before: int) -> bool:
            for task_id in list(pending):
                task = await self.store.get(task_id)
                if task.status.terminal:
                    done[task_id] = task
                    pending.discard(task_id)
            return len(pending) < before or not pending

        while pending:
            try:
                await poll(
                    partial(one_more, len(pending)), "a task finished", interval=0.2, deadline_s=stall_s
                )
            except AssertionError:
                raise AssertionError(
                    f"{len(pending)} tasks never finished, e.g. {sorted(pending)[:3]}\n{self.logs()}"
                ) from None
        return done

    async def running_on(self) -> dict[int, list[Task]]:
        """The running tasks by the pid in their lease (``host:pid:runner/claim``), one query."""
        page = await self.store.list_tasks(TaskStatus.RUNNING, limit=100)
        out: dict[int, list[Task]] = {}
        for task in page.items:
            pid = lease_pid(task)
            if pid is not None:
                out.setdefault(pid, []).append(task)
        return out

    async def events(self, task_id: str) -> list[TaskEvent]:
        return await self.store.events(task_id)

    async def completed_events(self, task_id: str) -> int:
        return sum(
            1 for e in await self.events(task_id) if e.kind == "state" and e.data.get("status") == "completed"
        )

    async def once_problems(self, job: str, task: Task, expected: str) -> list[str]:
        """What says ``job``'s task did not complete exactly once: another status or result than
        ``expected``, other than one 'completed' state event, finished work the journal saw redone."""
        problems: list[str] = []
        if task.status is not TaskStatus.COMPLETED or task.result != expected:
            problems.append(f"{job}: {task.status.value}, result {task.result!r}, error {task.error!r}")
        completed = await self.completed_events(task.id)
        if completed != 1:
            problems.append(f"{job}: {completed} 'completed' state events")
        redone = self.journal.redone(job)
        if redone:
            problems.append(f"{job}: finished work redone: {redone} ({self.journal.counts(job)})")
        return problems


def lease_pid(task: Task) -> int | None:
    """The worker pid in a task's lease owner (``host:pid:runner/claim``); None without a lease."""
    parts = (task.lease_owner or "").split(":")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


async def _wait_http(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    async with httpx.AsyncClient(timeout=2) as client:

        async def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n{_tail(log)}")
            try:
                return (await client.get(f"{url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await poll(ready, "serve ready")


@asynccontextmanager
async def deployment(
    tmp: Path,
    *,
    broker_url: str,
    store_url: str | None = None,
    workers: int = 1,
    worker: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    llm_delay: float = 0.0,
    llm_timeout_s: float = 30.0,
    mcp_servers: dict[str, Any] | None = None,
    llm_url: str | None = None,
) -> AsyncIterator[Stack]:
    """The whole deployment; without ``store_url``, a schema of its own on the shared PostgreSQL,
    dropped after, and with ``broker_url`` amqp a unique queue, deleted after (on a shared RabbitMQ).
    ``mcp_servers`` are configured beside ``c`` (another opspawn, for chaining); ``llm_url`` is
    the model's endpoint instead of the counting LLM (whose journal then has no model calls)."""
    control = Control(tmp / "control")
    control.path.mkdir(parents=True, exist_ok=True)
    journal = Journal(tmp / "journal.jsonl")
    queue = f"opspawn_fault_{uuid.uuid4().hex[:10]}"
    shared_schema = None
    if store_url is None:
        require_service("postgres")
        shared_schema = f"opspawn_fault_{uuid.uuid4().hex[:10]}"
        store_url = f"{POSTGRES_URL}?schema={shared_schema}"
    http_port = free_port()
    async with AsyncExitStack() as exits:
        base_url = llm_url or exits.enter_context(
            spawn_counting_llm(journal.path, control.path, delay=llm_delay)
        )
        config = {
            "mcpServers": {
                "c": mcp_server_entry(journal.path, control.path, **(server or {})),
                **(mcp_servers or {}),
            },
            "opspawn": {
                "store_url": store_url,
                "broker_url": broker_url,
                "llm": {
                    "provider": "openai",
                    "base_url": base_url,
                    "model": "fake",
                    "timeout_s": llm_timeout_s,
                },
                "server": {"host": "127.0.0.1", "port": http_port},
                "worker": {
                    "concurrency": 4,
                    "lease_ttl_s": 2,
                    "max_attempts": 5,
                    "queue_name": queue,
                    **(worker or {}),
                },
            },
        }
        config_path = tmp / "opspawn.json"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        if broker_url.startswith("amqp") and shared_schema is not None:
            exits.push_async_callback(asyncio.to_thread, delete_queues, queue)
        if shared_schema is not None:
            exits.push_async_callback(drop_schema, shared_schema)
        serve_log = tmp / "serve.log"
        serve = exits.enter_context(
            opspawn_process(
                "--config", str(config_path), "serve", cwd=REPO_ROOT, env=deployment_env(), log=serve_log
            )
        )
        http = f"http://127.0.0.1:{http_port}"
        await _wait_http(serve, http, serve_log)
        store = open_store(store_url)
        await store.start()
        stack = Stack(tmp, config_path, http, journal, control, store, serve, store_url=store_url)

        async def close_store() -> None:
            await stack.store.close()

        exits.push_async_callback(close_store)
        exits.callback(_reap, stack)
        for _ in range(workers):
            await stack.add_worker()
        yield stack


def _reap(stack: Stack) -> None:
    """Teardown: release every hold, kill -9 the workers and every downstream process (SIGCONT
    first: a SIGSTOPped one must not keep serve's shutdown waiting)."""
    stack.control.release_all()
    for worker in stack.workers:
        if worker.alive():
            worker.kill_hard()
    for pid in stack.journal.mcp_pids():
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)
            os.killpg(pid, signal.SIGKILL)
