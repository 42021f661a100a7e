"""End-to-end agent tasks/s on RabbitMQ + PostgreSQL, against two baselines measured in the same run.

Each task is two LLM calls (the fake OpenAI-compatible server in rule mode: the goal ``echo ...``
makes it call ``t__echo``, then answer ``done: ...``) and one proxied MCP tool call (the testing
server over stdio). Per round, interleaved, each system started fresh on its own queue/schema:

* ``noop``: a no-op ``async def`` Dramatiq actor, 2 worker processes, same broker and queue setup
  (``build_rabbitmq_broker``, AsyncIO middleware, confirm_delivery, prefetch = threads);
* ``minimal``: the same work hand-written in a plain async Dramatiq actor, 2 worker processes:
  the two LLM calls over one shared ``httpx.AsyncClient``, the MCP call over one open
  ``ClientSession`` (stdio, same testing server), one INSERT and one UPDATE (asyncpg pool);
  the floor opspawn's overhead is measured against;
* ``opspawn``: a real ``opspawn-mcp serve`` (REST submits) + 2 ``opspawn-mcp worker`` processes;
* ``embedded``: ``opspawn-mcp serve`` alone on its default store and broker (SQLite, in-process).

Clock: from the first submit/enqueue to the last task finished (UDP datagram per finished task for
the baselines, the store polled every 0.1 s for opspawn). Needs RabbitMQ on 127.0.0.1:5672 and
PostgreSQL on :5432 (db ``test``); every queue and schema is unique and removed afterwards.

    .venv/bin/python bench/bench_throughput.py [--tasks 300] [--rounds 3] [--quick] [--profile FILE]

``--profile FILE`` runs py-spy on one opspawn worker during the last opspawn round and prints its
top frames (self and inclusive share). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.services import delete_queues  # noqa: E402

RABBITMQ_URL = os.environ.get("OPSPAWN_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_DSN = os.environ.get("OPSPAWN_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
STORE_PG = "postgresql+asyncpg://" + PG_DSN.split("://", 1)[1]
OPSPAWN = str(Path(sys.executable).parent / "opspawn-mcp")
BASELINE_ACTOR = "bench_task"
READY = "bench worker ready"


# -- small process helpers (shared with bench_inflight.py) ---------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process in its own session (so its children are stopped with it), output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, wait, then SIGKILL the process group (only the processes this bench started)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(predicate: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_log(proc: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 120) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(
                f"{proc.args} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        return log.exists() and marker in log.read_text(errors="replace")

    wait_for(ready, f"{marker!r} in {log}", timeout)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import httpx

    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited {proc.returncode}")
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, url, timeout)


@contextlib.contextmanager
def fake_llm(log: Path) -> Iterator[tuple[str, int]]:
    """The fake OpenAI-compatible server (rule mode) in its own process: (base_url, port)."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "tests.support.fake_openai", "--port", str(port)], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        LLM_PIDS[:] = [proc.pid]
        yield f"http://127.0.0.1:{port}/v1", port
    finally:
        stop(proc)


LLM_PIDS: list[int] = []


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their live descendants."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            pass
    return total


def cpu_split(roles: dict[str, list[int]]) -> dict[str, float]:
    return {role: cpu_s(pids) for role, pids in roles.items()}


def cpu_per_task(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """CPU milliseconds per task by role over the measured window."""
    return {role: 1000 * (after[role] - before[role]) / n for role in before}


def testing_server(tmp: Path, pid_log: str) -> dict[str, Any]:
    return {
        "command": sys.executable,
        "args": ["-m", "tests.servers.testing_server", "--pid-log", str(tmp / pid_log)],
        "cwd": str(ROOT),
    }


async def pg_exec(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def summary(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    return (
        "min "
        + " / median ".join([fmt.format(min(values)), fmt.format(statistics.median(values))])
        + (" / max " + fmt.format(max(values)))
    )


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    pkgs = ", ".join(
        f"{p} {metadata.version(p)}"
        for p in ("dramatiq", "pika", "sqlalchemy", "asyncpg", "httpx", "openai", "mcp", "uvicorn")
    )
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {pkgs}"


# -- the baseline worker processes (``_worker`` subcommand) ---------------------------------------

SYSTEM = "You are an agent. Use the tools to reach the goal, then answer."


def run_baseline_worker(args: argparse.Namespace) -> None:
    """A plain Dramatiq worker: ``noop`` or the hand-written ``minimal`` pipeline."""
    import dramatiq
    from dramatiq.asyncio import get_event_loop_thread
    from dramatiq.middleware.asyncio import AsyncIO

    from opspawn_mcp.broker import build_rabbitmq_broker

    broker = build_rabbitmq_broker(RABBITMQ_URL, middleware=[AsyncIO()])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    done_addr = ("127.0.0.1", args.udp)
    res: dict[str, Any] = {}

    async def noop(i: int) -> None:
        udp.sendto(b"1", done_addr)

    async def minimal(i: int) -> None:
        pool, http, session, tools = res["pool"], res["http"], res["session"], res["tools"]
        goal = f"echo bench task {i}"
        await pool.execute(
            f'INSERT INTO "{args.schema}".runs (id, status, goal, created_at) VALUES ($1, $2, $3, now())',
            i,
            "running",
            goal,
        )
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": goal},
        ]
        body = {"model": "fake-model", "messages": messages, "tools": tools}
        reply = (await http.post("/chat/completions", json=body)).json()["choices"][0]["message"]
        call = reply["tool_calls"][0]
        name = call["function"]["name"].split("__", 1)[1]
        result = await session.call_tool(name, json.loads(call["function"]["arguments"]))
        text = "".join(getattr(c, "text", "") for c in result.content)
        messages += [reply, {"role": "tool", "tool_call_id": call["id"], "content": text}]
        answer = (await http.post("/chat/completions", json=body)).json()["choices"][0]["message"]
        await pool.execute(
            f'UPDATE "{args.schema}".runs SET status = $2, result = $3, finished_at = now() WHERE id = $1',
            i,
            "completed",
            answer["content"],
        )
        udp.sendto(b"1", done_addr)

    fn: Any = noop if args.kind == "noop" else minimal
    dramatiq.Actor(
        fn, broker=broker, actor_name=BASELINE_ACTOR, queue_name=args.queue, priority=0, options={}
    )
    worker = dramatiq.Worker(broker, worker_threads=args.threads, worker_timeout=1000)
    worker.queue_prefetch = args.threads
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    async def resources(ready: threading.Event, done: asyncio.Event) -> None:
        import asyncpg
        import httpx
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(
            command=sys.executable, args=["-m", "tests.servers.testing_server"], cwd=str(ROOT)
        )
        async with (
            asyncpg.create_pool(PG_DSN, min_size=args.threads, max_size=args.threads) as pool,
            httpx.AsyncClient(base_url=args.llm, timeout=30) as http,
            stdio_client(params) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            listed = await session.list_tools()
            res["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": f"t__{t.name}",
                        "description": t.description or "",
                        "parameters": t.input_schema,
                    },
                }
                for t in listed.tools
            ]
            res.update(pool=pool, http=http, session=session)
            ready.set()
            await done.wait()

    worker.start()
    loop = get_event_loop_thread().loop  # type: ignore[union-attr]
    done: asyncio.Event | None = None
    future = None
    if args.kind == "minimal":
        ready = threading.Event()
        done = asyncio.Event()
        future = asyncio.run_coroutine_threadsafe(resources(ready, done), loop)
        while not ready.wait(0.1):
            if future.done():
                future.result()
    print(READY, flush=True)
    stopping.wait()
    worker.stop()
    if future is not None and done is not None:
        loop.call_soon_threadsafe(done.set)
        with contextlib.suppress(Exception):
            future.result(10)
    broker.close()


# -- the systems under test ----------------------------------------------------------------------


class Counter:
    """Counts ``done`` datagrams from the baseline workers; records when the n-th arrived."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.5)

    def wait(self, n: int, timeout: float) -> tuple[int, float]:
        got, deadline, last = 0, time.monotonic() + timeout, time.perf_counter()
        while got < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.sock.recv(16)
                got += 1
                last = time.perf_counter()
        return got, last


def run_baseline(kind: str, n: int, workers: int, threads: int, llm: str, tmp: Path) -> dict[str, Any]:
    import dramatiq

    from opspawn_mcp.broker import build_rabbitmq_broker

    run = uuid.uuid4().hex[:10]
    queue, schema = f"bench_{kind}_{run}", f"bench_min_{run}"
    if kind == "minimal":
        asyncio.run(
            pg_exec(
                f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".runs (id int PRIMARY KEY, status text, '
                "goal text, result text, created_at timestamptz, finished_at timestamptz)"
            )
        )
    counter = Counter()
    procs: list[subprocess.Popen[bytes]] = []
    broker = build_rabbitmq_broker(RABBITMQ_URL)
    try:
        logs = [tmp / f"{kind}-{run}-{w}.log" for w in range(workers)]
        for log in logs:
            procs.append(
                spawn(
                    [
                        sys.executable,
                        __file__,
                        "_worker",
                        "--kind",
                        kind,
                        "--queue",
                        queue,
                        "--udp",
                        str(counter.port),
                        "--schema",
                        schema,
                        "--llm",
                        llm,
                        "--threads",
                        str(threads),
                    ],
                    log,
                )
            )
        for proc, log in zip(procs, logs, strict=True):
            wait_log(proc, log, READY)
        broker.declare_queue(queue)
        roles = {"workers": [p.pid for p in procs], "llm": LLM_PIDS}
        cpu0 = cpu_split(roles)
        start = time.perf_counter()
        for i in range(n):
            broker.enqueue(
                dramatiq.Message(
                    queue_name=queue, actor_name=BASELINE_ACTOR, args=(i,), kwargs={}, options={}
                )
            )
        submitted = time.perf_counter()
        got, last = counter.wait(n, timeout=60 + n)
        wall = last - start
        cpu = cpu_per_task(cpu0, cpu_split(roles), n)
        return {
            "rate": got / wall,
            "done": got,
            "failed": n - got,
            "wall": wall,
            "submit": submitted - start,
            "cpu": cpu,
        }
    finally:
        broker.close()
        for proc in procs:
            stop(proc)
        counter.sock.close()
        delete_queues(queue)
        if kind == "minimal":
            asyncio.run(pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


async def submit_all(base: str, n: int, concurrency: int, goal: str) -> tuple[list[str], float]:
    """POST n tasks to ``base``/v1/tasks, ``concurrency`` at a time; (ids, seconds it took)."""
    import httpx

    ids: list[str] = []
    todo = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def one() -> None:
            for i in todo:
                r = await client.post("/v1/tasks", json={"goal": goal.format(i=i), "servers": ["t"]})
                if r.status_code != 202:
                    raise SystemExit(f"submit failed: {r.status_code} {r.text}")
                ids.append(r.json()["task_id"])

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return ids, time.perf_counter() - start


FINISHED = ("completed", "failed", "cancelled")


async def pg_counts(conn: Any, schema: str) -> collections.Counter[str]:
    rows = await conn.fetch(f'SELECT status, count(*) AS n FROM "{schema}".tasks GROUP BY status')
    return collections.Counter({r["status"]: r["n"] for r in rows})


def pg_errors(schema: str) -> collections.Counter[str]:
    async def go() -> collections.Counter[str]:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            rows = await conn.fetch(
                f"SELECT left(coalesce(error, ''), 120) AS e, count(*) AS n FROM \"{schema}\".tasks "
                "WHERE status <> 'completed' GROUP BY 1"
            )
            return collections.Counter({r["e"]: r["n"] for r in rows})
        finally:
            await conn.close()

    return asyncio.run(go())


async def run_submits_and_wait(
    base: str, n: int, counts: Any, limit_s: float, goal: str = "echo bench task {i}", concurrency: int = 16
) -> dict[str, Any]:
    start = time.perf_counter()
    submit = asyncio.ensure_future(submit_all(base, n, concurrency, goal))
    deadline = time.monotonic() + limit_s
    finished: collections.Counter[str] = collections.Counter()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        finished = await counts()
        if sum(finished[s] for s in FINISHED) >= n:
            break
    last = time.perf_counter()
    _, submit_s = await submit
    wall = last - start
    return {
        "rate": finished["completed"] / wall,
        "done": finished["completed"],
        "failed": n - finished["completed"],
        "wall": wall,
        "submit": submit_s,
        "statuses": dict(finished),
    }


def profile_worker(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    pyspy = str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            pyspy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            "100",
            "--gil",
            "--nonblocking",
            "-f",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def report_profile(path: Path, top: int = 25) -> None:
    """Top frames of a py-spy ``raw`` (collapsed) profile: self share and inclusive share."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    idle_total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        total += k
        leaf = frames[-1]
        if any(w in leaf for w in ("select (selectors.py", "wait (threading.py", "_wait_for_tstate_lock")):
            idle_total += k
        own[leaf] += k
        for f in set(frames):
            incl[f] += k
    print(f"\npy-spy profile {path}: {total} samples ({idle_total} idle waits in selectors/threading)")
    print("top self frames (share of all samples):")
    for frame, k in own.most_common(top):
        print(f"  {100 * k / total:5.1f}%  {frame}")
    print("top inclusive frames (share of all samples):")
    for frame, k in incl.most_common(top + 15):
        print(f"  {100 * k / total:5.1f}%  {frame}")


def run_opspawn(
    n: int, workers: int, concurrency: int, llm: str, tmp: Path, profile: Path | None = None
) -> dict[str, Any]:
    import asyncpg

    run = uuid.uuid4().hex[:10]
    queue, schema = f"bench_ops_{run}", f"bench_ops_{run}"
    raw = {
        "mcpServers": {"t": testing_server(tmp, f"pids-{run}")},
        "opspawn": {
            "store_url": f"{STORE_PG}?schema={schema}",
            "broker_url": RABBITMQ_URL,
            "llm": {"provider": "openai", "base_url": llm, "model": "fake-model", "timeout_s": 60},
            "worker": {"concurrency": concurrency},
        },
    }
    cfg = tmp / f"opspawn-{run}.json"
    cfg.write_text(json.dumps(raw))
    env = {"OPSPAWN_WORKER_QUEUE_NAME": queue}
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        serve_log = tmp / f"serve-{run}.log"
        serve = spawn([OPSPAWN, "--config", str(cfg), "serve", "--port", str(port)], serve_log, env)
        procs.append(serve)
        wait_http(f"http://127.0.0.1:{port}/healthz", serve)  # the schema exists once serve is up
        wlogs = [tmp / f"worker-{run}-{w}.log" for w in range(workers)]
        wprocs = [spawn([OPSPAWN, "--config", str(cfg), "worker"], log, env) for log in wlogs]
        procs += wprocs
        for proc, log in zip(wprocs, wlogs, strict=True):
            wait_log(proc, log, "opspawn-mcp worker ready")

        async def go() -> dict[str, Any]:
            conn = await asyncpg.connect(PG_DSN)
            spy = profile_worker(wprocs[0].pid, max(5, n / 60), profile) if profile else None
            roles = {"serve": [serve.pid], "workers": [p.pid for p in wprocs], "llm": LLM_PIDS}
            cpu0 = cpu_split(roles)
            try:
                res = await run_submits_and_wait(
                    f"http://127.0.0.1:{port}", n, lambda: pg_counts(conn, schema), limit_s=120 + 2 * n
                )
                res["cpu"] = cpu_per_task(cpu0, cpu_split(roles), n)
                return res
            finally:
                await conn.close()
                if spy is not None:
                    await asyncio.to_thread(spy.wait, 120)

        result = asyncio.run(go())
        if result["failed"]:
            result["errors"] = dict(pg_errors(schema))
        return result
    finally:
        for proc in reversed(procs):
            stop(proc)
        delete_queues(queue)
        asyncio.run(pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def run_embedded(n: int, llm: str, tmp: Path) -> dict[str, Any]:
    run = uuid.uuid4().hex[:10]
    db = tmp / f"embedded-{run}.db"
    raw = {
        "mcpServers": {"t": testing_server(tmp, f"pids-{run}")},
        "opspawn": {
            "store_url": f"sqlite+aiosqlite:///{db}",
            "llm": {"provider": "openai", "base_url": llm, "model": "fake-model", "timeout_s": 60},
        },
    }
    cfg = tmp / f"embedded-{run}.json"
    cfg.write_text(json.dumps(raw))
    port = free_port()
    serve = spawn([OPSPAWN, "--config", str(cfg), "serve", "--port", str(port)], tmp / f"embedded-{run}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", serve)
        # WAL mode: a reader never blocks the server's writer.
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)

        async def counts() -> collections.Counter[str]:
            rows = conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()
            return collections.Counter(dict(rows))

        roles = {"serve": [serve.pid], "llm": LLM_PIDS}
        cpu0 = cpu_split(roles)
        try:
            res = asyncio.run(
                run_submits_and_wait(f"http://127.0.0.1:{port}", n, counts, limit_s=120 + 2 * n)
            )
            res["cpu"] = cpu_per_task(cpu0, cpu_split(roles), n)
            return res
        finally:
            conn.close()
    finally:
        stop(serve)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("_worker", help=argparse.SUPPRESS)
    w.add_argument("--kind", choices=["noop", "minimal"], required=True)
    w.add_argument("--queue", required=True)
    w.add_argument("--udp", type=int, required=True)
    w.add_argument("--schema", required=True)
    w.add_argument("--llm", required=True)
    w.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=300, help="tasks per system per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (RabbitMQ systems)")
    parser.add_argument("--concurrency", type=int, default=8, help="threads / worker.concurrency per worker")
    parser.add_argument("--quick", action="store_true", help="60 tasks, 1 round: a smoke run")
    parser.add_argument(
        "--systems", default="noop,minimal,opspawn,embedded", help="comma-separated subset, in round order"
    )
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of one opspawn worker (last round)")
    args = parser.parse_args()
    if args.cmd == "_worker":
        run_baseline_worker(args)
        return
    if args.quick:
        args.tasks, args.rounds = 60, 1
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    print(f"machine: {machine()}")
    print(
        f"{args.tasks} tasks per system per round, {args.rounds} rounds, {args.workers} worker processes x "
        f"concurrency {args.concurrency}; order per round: {', '.join(systems)}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with (
        tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmpdir,
        fake_llm(Path(tmpdir) / "llm.log") as (
            llm,
            _,
        ),
    ):
        tmp = Path(tmpdir)
        for r in range(args.rounds):
            for s in systems:
                if s in ("noop", "minimal"):
                    res = run_baseline(s, args.tasks, args.workers, args.concurrency, llm, tmp)
                elif s == "opspawn":
                    prof = args.profile if args.profile and r == args.rounds - 1 else None
                    res = run_opspawn(args.tasks, args.workers, args.concurrency, llm, tmp, prof)
                else:
                    res = run_embedded(args.tasks, llm, tmp)
                results[s].append(res)
                extra = f" errors {res['errors']}" if res.get("errors") else ""
                extra += "  CPU ms/task: " + ", ".join(f"{k} {v:.1f}" for k, v in res["cpu"].items())
                print(
                    f"round {r + 1} {s:9s} {res['rate']:7.1f} tasks/s  done {res['done']}/{args.tasks}  "
                    f"wall {res['wall']:.2f} s  submit {res['submit']:.2f} s{extra}",
                    flush=True,
                )
    print("\n| system | tasks/s per round | min / median / max | completed |")
    print("|---|---|---|---|")
    for s in systems:
        rates = [x["rate"] for x in results[s]]
        done = sum(x["done"] for x in results[s])
        print(
            f"| {s} | {' / '.join(f'{v:.1f}' for v in rates)} | {summary(rates)} | "
            f"{done}/{args.tasks * len(rates)} |"
        )
    pairs = [("opspawn", "minimal", 0.5), ("opspawn", "noop", None), ("minimal", "noop", None)]
    pairs += [("embedded", "minimal", None), ("embedded", "opspawn", None)]
    print("\nratios, round by round (same round, same machine state):")
    for a, b, target in pairs:
        if a in results and b in results:
            ratios = [x["rate"] / y["rate"] for x, y in zip(results[a], results[b], strict=True)]
            verdict = ""
            if target is not None:
                met = statistics.median(ratios) >= target
                verdict = f"  target >= {target}: {'met' if met else 'MISSED'}"
            print(
                f"  {a} / {b}: {' / '.join(f'{v:.3f}' for v in ratios)}  ({summary(ratios, '{:.3f}')})"
                + verdict
            )
    if args.profile and args.profile.exists():
        report_profile(args.profile)


if __name__ == "__main__":
    main()
