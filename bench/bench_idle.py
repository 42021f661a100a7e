"""CPU per second of an idle ``opspawn-mcp serve`` with 20 clients waiting on events, against none.

One real ``opspawn-mcp serve`` per store (SQLite in a temp dir; PostgreSQL in a fresh schema,
dropped at the end), embedded broker, ``worker.concurrency: 1`` and a model profile pointing at a
socket that accepts and never answers (see ``bench_doors.py``). 200 tasks are submitted over REST:
the first one is ``running`` (blocked in its first model call for the whole run), 150 are then
cancelled (terminal), 49 stay ``queued`` (nobody runs them). That is the store an idle server
with a backlog has.

Rounds alternate, in the same serve process: ``waiters``: 20 REST SSE streams
(``GET /v1/tasks/{id}/events``) open on quiet tasks (the running one and 19 queued); ``none``: no
stream open. After a settle period the serve process's CPU is read over a fixed window from
``/proc/<pid>/stat`` (utime + stime, clock ticks: it includes threads that ended within the
window, e.g. aiosqlite's one thread per connection) and, at nanosecond resolution, from the sum
of ``/proc/<pid>/task/*/schedstat`` (threads alive at both ends only, so it misses short-lived
ones). Both are printed as CPU milliseconds per second (ms/s), with min/median/max over rounds and
the per-round ratio waiters / none of the stat figure (target: within 2x).

    .venv/bin/python bench/bench_idle.py [--stores sqlite,postgres] [--rounds 3] [--window 10]
        [--pg postgresql+asyncpg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_doors import (
    Server,
    black_hole,
    machine_line,
    spread,
    start_server,
    stop_server,
    wait_ready,
)

TASKS = 200
CANCELLED = 150
WAITERS = 20
SPEC: dict[str, Any] = {"goal": "idle benchmark", "max_steps": 3, "timeout_s": 3600}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_ns(pid: int) -> int:
    """The process's on-CPU time at ns resolution: the sum over its threads' schedstat."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total


async def populate(http: str) -> list[str]:
    """200 tasks: one running (blocked), 150 cancelled, 49 queued. Returns the quiet ones' ids."""
    import httpx

    async with httpx.AsyncClient(base_url=http, timeout=30) as client:
        ids = []
        for _ in range(TASKS):
            r = await client.post("/v1/tasks", json=SPEC)
            r.raise_for_status()
            ids.append(r.json()["task_id"])
        for task_id in ids[1 : 1 + CANCELLED]:
            (await client.post(f"/v1/tasks/{task_id}/cancel")).raise_for_status()
        deadline = time.monotonic() + 30
        while (await client.get(f"/v1/tasks/{ids[0]}")).json()["status"] != "running":
            if time.monotonic() > deadline:
                raise SystemExit("the first task never started running")
            await asyncio.sleep(0.1)
        counts: dict[str, int] = {}
        for task_id in ids:
            status = (await client.get(f"/v1/tasks/{task_id}")).json()["status"]
            counts[status] = counts.get(status, 0) + 1
        print(f"  store: {counts}", file=sys.stderr, flush=True)
        return [ids[0], *ids[1 + CANCELLED :]]


async def measure(pid: int, window: float) -> tuple[float, float]:
    """(ms of CPU per s from stat ticks, ms of CPU per s from schedstat) over ``window`` seconds."""
    t0, ticks0, ns0 = time.perf_counter(), cpu_ticks(pid), cpu_ns(pid)
    await asyncio.sleep(window)
    t1, ticks1, ns1 = time.perf_counter(), cpu_ticks(pid), cpu_ns(pid)
    elapsed = t1 - t0
    return (ticks1 - ticks0) / TICK / elapsed * 1000, (ns1 - ns0) / 1e9 / elapsed * 1000


class Opened:
    """Set once ``n`` streams have their 200."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.event = asyncio.Event()

    def one(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


async def wait_on(client: Any, task_id: str, opened: Opened) -> None:
    """One SSE waiter: open the task's event stream and read it until cancelled."""
    async with client.stream("GET", f"/v1/tasks/{task_id}/events") as response:
        assert response.status_code == 200, response.status_code
        opened.one()
        async for _ in response.aiter_bytes():
            pass


Arms = dict[str, list[tuple[float, float]]]


async def rounds(server: Server, quiet: list[str], n_rounds: int, window: float, settle: float) -> Arms:
    import httpx

    pid = server.proc.pid
    results: Arms = {"waiters": [], "none": []}
    limits = httpx.Limits(max_connections=WAITERS + 5, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.http, limits=limits, timeout=None) as client:
        for r in range(n_rounds):
            order = ("waiters", "none") if r % 2 == 0 else ("none", "waiters")
            for arm in order:
                streams: list[asyncio.Task[None]] = []
                if arm == "waiters":
                    opened = Opened(WAITERS)
                    streams = [asyncio.create_task(wait_on(client, t, opened)) for t in quiet[:WAITERS]]
                    await asyncio.wait_for(opened.wait(), 30)
                await asyncio.sleep(settle)
                results[arm].append(await measure(pid, window))
                for s in streams:
                    s.cancel()
                await asyncio.gather(*streams, return_exceptions=True)
                if streams:
                    await asyncio.sleep(settle)  # let serve notice the disconnects
                ticks, ns = results[arm][-1]
                print(
                    f"  round {r + 1} {arm:7s}: {ticks:6.1f} ms/s (live threads {ns:7.1f})", file=sys.stderr
                )
    return results


async def drop_schema(pg_url: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def git_head() -> str:
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "opspawn_mcp", "gateway").strip()
        return git("log", "-1", "--format=%h %s").strip()[:90] + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=10.0, help="seconds of CPU accounting per arm")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--pg", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--source",
        metavar="DIR",
        help="serve opspawn from this tree (on the server's PYTHONPATH), e.g. a `git archive` of a commit",
    )
    args = parser.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3")
    table: list[str] = []
    for store in args.stores.split(","):
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opspawn-idle-")))
            llm = stack.enter_context(black_hole())
            schema = f"bench_idle_{os.getpid()}"
            if store == "sqlite":
                url = f"sqlite+aiosqlite:///{directory / 'idle.db'}"
            elif store == "postgres":
                url = f"{args.pg}?schema={schema}"
            else:
                raise SystemExit(f"unknown store {store!r}")
            server = start_server(store, directory, llm, url, grpc=False, extra_path=args.source)
            try:
                wait_ready(server)
                print(f"{store}: populating", file=sys.stderr, flush=True)
                quiet = asyncio.run(populate(server.http))
                res = asyncio.run(rounds(server, quiet, args.rounds, args.window, args.settle))
            finally:
                stop_server(server)
                if store == "postgres":
                    asyncio.run(drop_schema(args.pg, schema))
        w_ns = [ns for _, ns in res["waiters"]]
        n_ns = [ns for _, ns in res["none"]]
        w_t = [t for t, _ in res["waiters"]]
        n_t = [t for t, _ in res["none"]]
        ratios = [a / b if b else float("inf") for a, b in zip(w_t, n_t, strict=True)]
        table.append(
            f"| {store} | {spread(w_t, '{:.0f}')} | {spread(n_t, '{:.0f}')} | {spread(ratios, '{:.1f}')} "
            f"| {spread(w_ns, '{:.1f}')} | {spread(n_ns, '{:.1f}')} |"
        )
    print(machine_line())
    print(f"opspawn from {args.source}" if args.source else f"opspawn: this tree at {git_head()}")
    print(
        f"{TASKS} tasks (1 running, blocked; {CANCELLED} cancelled; {TASKS - 1 - CANCELLED} queued); "
        f"{WAITERS} REST SSE waiters vs none, {args.rounds} interleaved rounds of {args.window:g} s "
        "each; min/median/max over rounds.\n"
    )
    print(
        "| store | serve CPU, 20 waiters (ms/s) | serve CPU, none (ms/s) | ratio (target <= 2) "
        "| live threads' schedstat: waiters | none |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in table:
        print(row)


if __name__ == "__main__":
    main()
