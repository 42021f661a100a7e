"""1,000 agent tasks in flight in one ``opspawn-mcp worker`` process, each one 2-second downstream call.

One worker process with ``worker.concurrency: 1000`` on RabbitMQ + PostgreSQL; a real
``opspawn-mcp serve`` takes the submits (REST, 32 in flight). Each task's goal is ``sleep 2``:
the fake OpenAI-compatible server (rule mode) answers with a ``t__sleep {"seconds": 2}`` call to
the testing MCP server over stdio, then with ``done: slept 2``. Per round, interleaved: one such
task alone on the warm worker (A), then N at once (B), on a fresh worker process.

Reported per round: B's wall time (first submit to last task finished) against A's and against the
target ``2 x A + queue drain`` (drain = how long the N submits took), completed/failed counts and
the failure reasons, the worker's RSS (before B, peak, after), its OS threads, the downstream
server processes the worker started (pid log) and had alive (its children), and the TCP connections
open to the fake LLM's port at peak (``ss -tn``, sampled every 0.25 s).

    .venv/bin/python bench/bench_inflight.py [--tasks 1000] [--rounds 3] [--quick] [--pool-size N]

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import (
    FINISHED,
    OPSPAWN,
    PG_DSN,
    RABBITMQ_URL,
    STORE_PG,
    delete_queue,
    fake_llm,
    free_port,
    machine,
    pg_exec,
    spawn,
    stop,
    submit_all,
    summary,
    testing_server,
    wait_http,
    wait_log,
)

GOAL = "sleep {seconds}"


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def downstream_children(pid: int) -> int:
    """Live testing-server processes under ``pid``."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    n = 0
    for kid in kids:
        try:
            if "tests.servers.testing_server" in " ".join(kid.cmdline()):
                n += 1
        except psutil.Error:
            pass
    return n


def llm_connections(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


class Sampler(threading.Thread):
    def __init__(self, pid: int, llm_port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.llm_port = pid, llm_port
        self.halt = threading.Event()
        self.peak_rss = self.peak_conns = self.peak_threads = self.peak_children = 0.0

    def run(self) -> None:
        while not self.halt.wait(0.25):
            try:
                self.peak_rss = max(self.peak_rss, rss_mb(self.pid))
                self.peak_threads = max(self.peak_threads, threads_of(self.pid))
                self.peak_children = max(self.peak_children, downstream_children(self.pid))
                self.peak_conns = max(self.peak_conns, llm_connections(self.llm_port))
            except OSError:
                return


async def counts_of(conn: Any, schema: str, ids: list[str]) -> collections.Counter[str]:
    rows = await conn.fetch(
        f'SELECT status, count(*) AS n FROM "{schema}".tasks WHERE id = ANY($1::text[]) GROUP BY status', ids
    )
    return collections.Counter({r["status"]: r["n"] for r in rows})


async def single(base: str, conn: Any, schema: str, seconds: float) -> float:
    start = time.perf_counter()
    ids, _ = await submit_all(base, 1, 1, GOAL.format(seconds=seconds))
    while True:
        c = await counts_of(conn, schema, ids)
        if sum(c[s] for s in FINISHED):
            if not c["completed"]:
                raise SystemExit(f"the single task did not complete: {dict(c)}")
            return time.perf_counter() - start
        await asyncio.sleep(0.02)


async def batch(base: str, conn: Any, schema: str, n: int, seconds: float, limit_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    ids, submit_s = await submit_all(base, n, 32, GOAL.format(seconds=seconds))
    c: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        c = await counts_of(conn, schema, ids)
        if sum(c[s] for s in FINISHED) >= n:
            break
        await asyncio.sleep(0.1)
    wall = time.perf_counter() - start
    rows = await conn.fetch(
        f'SELECT left(coalesce(error, status), 140) AS e, count(*) AS n FROM "{schema}".tasks '
        "WHERE id = ANY($1::text[]) AND status <> 'completed' GROUP BY 1",
        ids,
    )
    return {
        "wall": wall,
        "submit": submit_s,
        "statuses": dict(c),
        "errors": {r["e"]: r["n"] for r in rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="the downstream call's duration")
    parser.add_argument("--pool-size", type=int, help="opspawn.store.pool_size (default: the product's)")
    parser.add_argument("--quick", action="store_true", help="200 tasks, 1 round: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.rounds = 200, 1
    import asyncpg

    run = uuid.uuid4().hex[:10]
    queue, schema = f"bench_inflight_{run}", f"bench_inflight_{run}"
    print(f"machine: {machine()}")
    print(
        f"{args.tasks} tasks of one {args.seconds:g} s downstream call, one worker, concurrency {args.tasks}, "
        f"{args.rounds} rounds (A: one task alone, B: {args.tasks} at once); store pool_size "
        f"{args.pool_size or 'default'}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-inflight-") as tmpdir,
        fake_llm(Path(tmpdir) / "llm.log") as (
            llm,
            llm_port,
        ),
    ):
        tmp = Path(tmpdir)

        def config(name: str, pid_log: str) -> Path:
            store: dict[str, Any] = {"pool_size": args.pool_size} if args.pool_size else {}
            raw = {
                "mcpServers": {"t": testing_server(tmp, pid_log)},
                "opspawn": {
                    "store_url": f"{STORE_PG}?schema={schema}",
                    "broker_url": RABBITMQ_URL,
                    "llm": {"provider": "openai", "base_url": llm, "model": "fake-model", "timeout_s": 300},
                    "worker": {"concurrency": args.tasks},
                    **({"store": store} if store else {}),
                },
            }
            path = tmp / name
            path.write_text(json.dumps(raw))
            return path

        worker_cfg, serve_cfg = config("worker.json", "worker-pids"), config("serve.json", "serve-pids")
        env = {"OPSPAWN_WORKER_QUEUE_NAME": queue}
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        serve = spawn(
            [OPSPAWN, "--config", str(serve_cfg), "serve", "--port", str(port)], tmp / "serve.log", env
        )
        try:
            wait_http(f"{base}/healthz", serve)
            for r in range(args.rounds):
                log = tmp / f"worker-{r}.log"
                pids_before = _lines(tmp / "worker-pids")
                t0 = time.perf_counter()
                worker = spawn([OPSPAWN, "--config", str(worker_cfg), "worker"], log, env)
                try:
                    wait_log(worker, log, "opspawn-mcp worker ready", timeout=300)
                    boot_s = time.perf_counter() - t0
                    rss_idle = rss_mb(worker.pid)
                    threads_idle = threads_of(worker.pid)

                    async def go(
                        worker: subprocess.Popen[bytes],
                    ) -> tuple[float, float, dict[str, Any], Sampler]:
                        conn = await asyncpg.connect(PG_DSN)
                        try:
                            await single(base, conn, schema, args.seconds)  # warm-up
                            alone = await single(base, conn, schema, args.seconds)
                            rss_before = rss_mb(worker.pid)
                            sampler = Sampler(worker.pid, llm_port)
                            sampler.start()
                            try:
                                res = await batch(base, conn, schema, args.tasks, args.seconds, 900)
                            finally:
                                sampler.halt.set()
                                sampler.join()
                            return alone, rss_before, res, sampler
                        finally:
                            await conn.close()

                    alone, rss_before, res, sampler = asyncio.run(go(worker))
                    rss_after = rss_mb(worker.pid)
                    sessions = _lines(tmp / "worker-pids") - pids_before
                finally:
                    stop(worker, timeout=60)
                log_text = log.read_text(errors="replace")
                row = {
                    "alone": alone,
                    **res,
                    "target": 2 * alone + res["submit"],
                    "boot": boot_s,
                    "rss_idle": rss_idle,
                    "rss_before": rss_before,
                    "rss_peak": max(sampler.peak_rss, rss_after),
                    "rss_after": rss_after,
                    "threads_idle": threads_idle,
                    "threads_peak": sampler.peak_threads,
                    "sessions": sessions,
                    "children_peak": sampler.peak_children,
                    "llm_conns_peak": sampler.peak_conns,
                    "queuepool_in_log": log_text.count("QueuePool limit"),
                }
                rows.append(row)
                st = res["statuses"]
                print(
                    f"round {r + 1}: A alone {alone:.2f} s | B {args.tasks}: wall {res['wall']:.1f} s "
                    f"(submit/drain {res['submit']:.1f} s; target 2xA+drain {row['target']:.1f} s; "
                    f"{res['wall'] / alone:.1f}x A) completed {st.get('completed', 0)} failed "
                    f"{st.get('failed', 0)} other {args.tasks - st.get('completed', 0) - st.get('failed', 0)} | "
                    f"RSS idle {rss_idle:.0f} MB, before B {rss_before:.0f}, peak {row['rss_peak']:.0f} "
                    f"(+{row['rss_peak'] - rss_before:.0f}), after {rss_after:.0f} | threads {threads_idle}"
                    f"->{sampler.peak_threads:.0f} | downstream started {sessions}, alive peak "
                    f"{sampler.peak_children:.0f} | LLM conns peak {sampler.peak_conns:.0f} | "
                    f"QueuePool in log {row['queuepool_in_log']} | boot {boot_s:.1f} s",
                    flush=True,
                )
                if res["errors"]:
                    print(f"  not completed: {res['errors']}", flush=True)
        finally:
            stop(serve)
            delete_queue(queue)
            asyncio.run(pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))

    def col(key: str) -> list[float]:
        return [float(x[key]) for x in rows]

    print("\n| figure | per round | min / median / max | target |")
    print("|---|---|---|---|")

    def line(name: str, key: str, fmt: str, target: str) -> None:
        vals = col(key)
        per = " / ".join(fmt.format(v) for v in vals)
        print(f"| {name} | {per} | {summary(vals, fmt)} | {target} |")

    for x in rows:
        x["ratio"] = x["wall"] / x["alone"]
        x["vs_target"] = x["wall"] / x["target"]
        x["growth"] = x["rss_peak"] - x["rss_before"]
        x["completed"] = x["statuses"].get("completed", 0)
        x["failed"] = args.tasks - x["completed"]
    line("one task alone (s)", "alone", "{:.2f}", "")
    line(f"{args.tasks} in flight: wall (s)", "wall", "{:.1f}", "")
    line("queue drain: submits took (s)", "submit", "{:.1f}", "")
    line("wall / (2 x alone + drain)", "vs_target", "{:.2f}", "<= 1")
    line("wall / alone", "ratio", "{:.1f}", "")
    line("completed", "completed", "{:.0f}", f"{args.tasks}")
    line("not completed", "failed", "{:.0f}", "0")
    line("worker RSS growth during B, peak - before (MB)", "growth", "{:.0f}", "< 200")
    line("worker RSS peak (MB)", "rss_peak", "{:.0f}", "")
    line("worker OS threads, peak", "threads_peak", "{:.0f}", "")
    line("downstream processes started by the worker", "sessions", "{:.0f}", "1")
    line("LLM connections open, peak", "llm_conns_peak", "{:.0f}", "")
    line("QueuePool errors in the worker log", "queuepool_in_log", "{:.0f}", "0")
    print(f"\nmedian wall / alone: {statistics.median(col('ratio')):.1f}x")


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


if __name__ == "__main__":
    main()
