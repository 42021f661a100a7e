"""What the host pool costs and what it saves, measured in one run on this machine.

For stdio and streamable HTTP, against opspawn's example server (``echo``), it times:

- ``direct``: calls on one open ``ClientSession``, the floor for any client;
- ``pool``: the same calls through ``OpsMcpClient.call_tool`` (lookup, concurrency limit, counters);
- ``per-call connect``: a fresh transport + session + initialize for every call, what a client
  without a pool pays (for stdio that is a new process each time).

It prints mean latencies and the two ratios that matter: pool overhead over direct (target <= 20%)
and per-call connect over pool (target >= 20x on stdio). Ratios, not absolute times, are the
result: both sides run in the same process, against the same server, in alternating rounds
(direct, pool, direct, pool, ...); each figure is the median round, with min/median/max over the
rounds and the per-round pool/direct ratio printed beside it.

    .venv/bin/python bench/bench_pool.py [--calls 500] [--connects 15]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from opspawn_mcp.config import HttpServerConfig, ServerConfig, example_server_config  # noqa: E402
from opspawn_mcp.host import OpsMcpClient  # noqa: E402

ARGS = {"text": "benchmark"}


async def _time_calls(n: int, call: Callable[[], Awaitable[object]]) -> float:
    """Mean seconds per call over ``n`` sequential calls, after a few warm-up calls."""
    for _ in range(min(3, n)):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return statistics.fmean(samples)


@asynccontextmanager
async def _session(transport: str, url: str) -> AsyncIterator[ClientSession]:
    if transport == "stdio":
        config = example_server_config()
        params = StdioServerParameters(command=config.command, args=config.args, cwd=str(REPO_ROOT))
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield s
    else:
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield s


async def _bench(transport: str, url: str, calls: int, connects: int) -> dict[str, object]:
    """Direct and pool are measured in alternating rounds so drift (warm-up, CPU boost) hits both."""
    server: ServerConfig = (
        example_server_config()
        if transport == "stdio"
        else HttpServerConfig(url=url, transport="streamable-http")
    )
    rounds = 5
    direct: list[float] = []
    pooled: list[float] = []
    async with _session(transport, url) as session, OpsMcpClient({"example": server}) as pool:
        for _ in range(rounds):
            direct.append(await _time_calls(calls // rounds, lambda: session.call_tool("echo", ARGS)))
            pooled.append(await _time_calls(calls // rounds, lambda: pool.call_tool("example", "echo", ARGS)))

    async def connect_and_call() -> None:
        async with _session(transport, url) as s:
            await s.call_tool("echo", ARGS)

    per_call = await _time_calls(connects, connect_and_call)
    return {
        "direct": statistics.median(direct),
        "pool": statistics.median(pooled),
        "per_call": per_call,
        "rounds": (direct, pooled),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the example server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the example server did not start listening within 60s")


def _spread(values: list[float], scale: float = 1e3) -> str:
    return "/".join(f"{v * scale:.3f}" for v in (min(values), statistics.median(values), max(values)))


def _report(transport: str, r: dict[str, object]) -> None:
    direct, pool, per_call = float(r["direct"]), float(r["pool"]), float(r["per_call"])  # type: ignore[arg-type]
    d_rounds: list[float]
    p_rounds: list[float]
    d_rounds, p_rounds = r["rounds"]  # type: ignore[misc]
    overhead = (pool / direct - 1) * 100
    speedup = per_call / pool
    ratios = [p / d for p, d in zip(p_rounds, d_rounds, strict=True)]
    print(f"\n{transport}")
    print(f"  direct session     {direct * 1e3:9.3f} ms/call   rounds min/median/max {_spread(d_rounds)}")
    print(f"  pool (OpsMcpClient) {pool * 1e3:8.3f} ms/call   rounds min/median/max {_spread(p_rounds)}")
    print(f"    overhead vs direct: {overhead:+.1f}% (pool/direct per round {_spread(ratios, 1)})")
    print(f"  per-call connect   {per_call * 1e3:9.3f} ms/call   pool is {speedup:.0f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="sequential calls per direct/pool run")
    parser.add_argument("--connects", type=int, default=15, help="calls for the connect-per-call run")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; example server echo, sequential calls")
    results = {"stdio": anyio.run(_bench, "stdio", "", args.calls, args.connects)}
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "opspawn_mcp.example_server",
            "--transport",
            "streamable-http",
            "--port",
            str(port),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
        url = f"http://127.0.0.1:{port}/mcp"
        results["streamable-http"] = anyio.run(_bench, "streamable-http", url, args.calls, args.connects)
    finally:
        process.terminate()
        process.wait(timeout=10)
    for transport, r in results.items():
        _report(transport, r)


if __name__ == "__main__":
    main()
