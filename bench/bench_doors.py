"""Submit latency and throughput through each front door, as ratios to calling TaskService in process.

What it measures: the cost a door adds to ``TaskService.submit`` (HTTP/2-less HTTP/1.1 + JSON for
REST, protobuf over HTTP/2 for gRPC, JSON-RPC over streamable HTTP for MCP). The server runs in
its own process (``--serve``) with the memory store and an enqueuer that drops ids, so no worker
competes for the CPU and the numbers are the doors', not the agents'. The client runs the
in-process baseline against an identical service of its own.

    python bench/bench_doors.py [--n 500] [--concurrency 32]

Prints a Markdown table; results go in docs/rest.md ("Benchmark").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import gateway_routes  # noqa: E402
from opspawn_mcp.config import parse_config  # noqa: E402
from opspawn_mcp.grpc_internal import serve_grpc  # noqa: E402
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb  # noqa: E402
from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc  # noqa: E402
from opspawn_mcp.host.models import ServerInfo  # noqa: E402
from opspawn_mcp.http_guard import HttpGuard  # noqa: E402
from opspawn_mcp.principals import LOCAL, Principals  # noqa: E402
from opspawn_mcp.service import TaskService  # noqa: E402
from opspawn_mcp.store.memory import MemoryStore  # noqa: E402

SPEC: dict[str, Any] = {"goal": "echo benchmark", "max_steps": 3}


class DroppingEnqueuer:
    """Accepts ids and runs nothing: the benchmark is about the doors, not the workers."""

    async def enqueue(self, task_id: str) -> None:
        return None

    async def ping(self) -> None:
        return None


class NoServers:
    def servers_info(self) -> list[ServerInfo]:
        return []


CONFIG = parse_config({"opspawn": {"store_url": "memory://", "llm": {"provider": "local"}}}, environ={})


def make_service() -> TaskService:
    return TaskService(CONFIG, MemoryStore(), DroppingEnqueuer(), NoServers())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- server side ------------------------------------------------------------------------------


async def serve(http_port: int, grpc_port: int) -> None:
    import uvicorn

    from opspawn_mcp.server import build_http_app, build_server

    service = make_service()
    principals = Principals.from_config(CONFIG, {})
    guard = HttpGuard.for_server(principals, "127.0.0.1", http_port)
    app = build_http_app(build_server(service), guard, extra_routes=gateway_routes(service))
    async with serve_grpc(service, "127.0.0.1", grpc_port, principals):
        config = uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning", access_log=False)
        await uvicorn.Server(config).serve()


# -- client side ------------------------------------------------------------------------------

Submit = Callable[[], Awaitable[Any]]


async def measure(submit: Submit, n: int, concurrency: int) -> tuple[float, float]:
    """(median latency in ms of ``n`` sequential submits, submits/s with ``concurrency`` in flight)."""
    for _ in range(min(50, n)):  # warm up connections, caches and the JIT-less interpreter alike
        await submit()
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        await submit()
        latencies.append((time.perf_counter() - start) * 1000)
    total = n * 4
    queue = iter(range(total))

    async def worker() -> None:
        for _ in queue:
            await submit()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = total / (time.perf_counter() - start)
    return statistics.median(latencies), rate


async def run_client(http: str, grpc_target: str, n: int, concurrency: int) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []
    service = make_service()
    rows.append(
        (
            "in-process TaskService.submit",
            *await measure(lambda: service.submit(SPEC, by=LOCAL), n, concurrency),
        )
    )

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=http, limits=limits) as rest:

        async def rest_submit() -> None:
            r = await rest.post("/v1/tasks", json=SPEC)
            assert r.status_code == 202, r.text

        rows.append(("REST POST /v1/tasks", *await measure(rest_submit, n, concurrency)))

        async def rest_floor() -> None:
            r = await rest.get("/healthz")
            assert r.status_code == 200

        # The same HTTP stack with no service call: what is HTTP's, and what is the gateway's.
        rows.append(("(HTTP floor: REST GET /healthz)", *await measure(rest_floor, n, concurrency)))

    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.TaskServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.SubmitTaskRequest(spec=pb.TaskSpec(goal=SPEC["goal"], max_steps=SPEC["max_steps"]))

        async def grpc_submit() -> None:
            await stub.SubmitTask(request)

        rows.append(("gRPC SubmitTask", *await measure(grpc_submit, n, concurrency)))

    async with (
        httpx2.AsyncClient(timeout=30.0) as http_client,
        Client(streamable_http_client(f"{http}/mcp", http_client=http_client)) as mcp,
    ):

        async def mcp_submit() -> None:
            result = await mcp.call_tool("submit_task", dict(SPEC))
            assert not result.is_error, result

        rows.append(("MCP tools/call submit_task", *await measure(mcp_submit, n, concurrency)))
    return rows


def wait_ready(http: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the benchmark server exited")
        try:
            if httpx.get(f"{http}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit("the benchmark server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--n", type=int, default=500, help="sequential submits for latency (x4 for throughput)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--serve", nargs=2, type=int, metavar=("HTTP_PORT", "GRPC_PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(http_port), str(grpc_port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        http = f"http://127.0.0.1:{http_port}"
        wait_ready(http, proc)
        rows = asyncio.run(run_client(http, f"127.0.0.1:{grpc_port}", args.n, args.concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base_latency, base_rate = rows[0][1], rows[0][2]
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; ")
    print(
        f"n={args.n} sequential submits (median latency), {args.n * 4} at concurrency {args.concurrency}.\n"
    )
    print("| path | submit latency p50 (ms) | x in-process | submits/s | / in-process |")
    print("|---|---:|---:|---:|---:|")
    for name, latency, rate in rows:
        print(
            f"| {name} | {latency:.3f} | {latency / base_latency:.1f}x | {rate:,.0f} | {rate / base_rate:.3f} |"
        )


if __name__ == "__main__":
    main()
