"""Submit latency at each front door of a real ``opspawn-mcp serve``, against a no-op on the same connection.

For each door, on ONE kept-alive connection (the client opens it once and reuses it), requests
alternate submit / no-op / submit / no-op ...:

- REST: ``POST /v1/tasks`` vs ``GET /healthz`` (one ``httpx.AsyncClient``, keep-alive);
- gRPC: ``TaskService/SubmitTask`` vs ``grpc.health.v1.Health/Check`` (one channel);
- MCP: ``tools/call submit_task`` vs ``ping`` (one ``mcp.Client`` session over streamable HTTP).

The server is a real ``opspawn-mcp serve`` subprocess (HTTP + gRPC ports, embedded broker,
``memory://`` store by default, ``--store sqlite`` for a temp-dir SQLite file). So that no agent
competes for the CPU, the worker runs one task at a time (``worker.concurrency: 1``) and the model
profile points at a socket that accepts connections and never answers: the first task blocks in
its first model call, every later one stays ``queued``. What is measured is the doors.

Server variants, all started at once and measured in interleaved rounds (A B C D, A B C D, ...):

- ``installed``: ``opspawn-mcp serve`` with this venv as it is;
- ``proto0``: the same runtime (``opspawn_mcp.cli._serve``) on a listening socket made the old way,
  ``socket(AF_INET, SOCK_STREAM)`` (proto 0), so asyncio does not set TCP_NODELAY on accepted
  connections: the A/B for the 40 ms kept-alive stall;
- with ``--standard DIR`` (a dir holding ``httptools`` and ``uvloop``, e.g. made by
  ``pip install --target DIR httptools uvloop``; it goes on the server's PYTHONPATH only):
  ``standard``: ``opspawn-mcp serve`` with them importable; ``standard+uvloop``: the same runtime
  with ``uvloop.install()`` before ``asyncio.run`` (what ``cmd_serve`` would need to use uvloop).

Whether a server process really loaded httptools / uvloop is read from its ``/proc/<pid>/maps``.

    .venv/bin/python bench/bench_doors.py [--rounds 5] [--n 200] [--standard DIR] [--store sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH, so a server given another tree imports that one

SPEC: dict[str, Any] = {"goal": "door benchmark", "max_steps": 3}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def black_hole() -> Iterator[str]:
    """A base URL whose server accepts TCP connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        sock.close()


def serve_config(
    directory: Path, http_port: int, grpc_port: int | None, llm_url: str, store_url: str
) -> Path:
    """A config file for one quiet serve: its own store, one worker slot, a model that never answers."""
    server: dict[str, Any] = {"host": "127.0.0.1", "port": http_port}
    if grpc_port is not None:
        server["grpc_port"] = grpc_port
    raw = {
        "mcpServers": {},
        "opspawn": {
            "store_url": store_url,
            "broker_url": "embedded",
            "llm": {
                "provider": "openai",
                "base_url": llm_url,
                "model": "bench",
                "api_key_env": "OPSPAWN_BENCH_KEY",
                "timeout_s": 3600,
            },
            "worker": {"concurrency": 1},
            "server": server,
        },
    }
    path = directory / f"opspawn-{http_port}.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@dataclass
class Server:
    name: str
    http: str
    grpc_target: str | None
    proc: subprocess.Popen[bytes]
    log: Path
    loaded: dict[str, bool] = field(default_factory=dict)


def start_server(
    name: str,
    directory: Path,
    llm_url: str,
    store_url: str,
    *,
    grpc: bool = True,
    harness: dict[str, str] | None = None,
    extra_path: str | None = None,
) -> Server:
    """``opspawn-mcp serve`` (or, with ``harness``, this file's ``--harness`` twin of it)."""
    http_port = free_port()
    grpc_port = free_port() if grpc else None
    config = serve_config(directory, http_port, grpc_port, llm_url, store_url)
    env = {**os.environ, "OPSPAWN_BENCH_KEY": "bench"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    if harness is None:
        cmd = [str(BIN / "opspawn-mcp"), "--config", str(config), "serve", "--port", str(http_port)]
    else:
        cmd = [sys.executable, __file__, "--harness", str(config), json.dumps(harness)]
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=directory, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(
        name, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}" if grpc else None, proc, log
    )


def wait_ready(server: Server, timeout_s: float = 90.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.name}: serve exited:\n{server.log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{server.http}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{server.name}: serve did not get ready:\n{server.log.read_text(errors='replace')}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def loaded_modules(pid: int) -> dict[str, bool]:
    """Which accelerators the process has really loaded (their extension modules are mapped)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {
        "httptools": "httptools/parser/parser" in maps,
        "uvloop": "uvloop/loop." in maps,
    }


def machine_line() -> str:
    import grpc
    import httpx
    import uvicorn

    try:
        from importlib.metadata import version

        mcp_version = version("mcp")
    except Exception:  # pragma: no cover - informational only
        mcp_version = "?"
    return (
        f"{platform.node()}: Linux {platform.release()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; uvicorn {uvicorn.__version__}, grpcio {grpc.__version__}, "
        f"httpx {httpx.__version__}, mcp {mcp_version}"
    )


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the client side ----------------------------------------------------------------------------

Call = Callable[[], Awaitable[Any]]
DOORS = ("REST", "gRPC", "MCP")
DOOR_LABELS = {
    "REST": ("POST /v1/tasks", "GET /healthz"),
    "gRPC": ("SubmitTask", "Health/Check"),
    "MCP": ("tools/call submit_task (legacy session)", "ping"),
}


async def pairs(submit: Call, noop: Call, n: int) -> tuple[list[float], list[float]]:
    """``n`` submit and ``n`` no-op latencies (ms), alternating on the same connection."""
    subs: list[float] = []
    noops: list[float] = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await submit()
        t1 = clock()
        await noop()
        t2 = clock()
        subs.append((t1 - t0) * 1000)
        noops.append((t2 - t1) * 1000)
    return subs, noops


class Doors:
    """One kept-alive connection per door to one server, opened once."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.calls: dict[str, tuple[Call, Call]] = {}
        self._stack: Any = None

    async def __aenter__(self) -> Doors:
        from contextlib import AsyncExitStack

        import grpc
        import httpx
        import httpx2
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
        from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc

        stack = await AsyncExitStack().__aenter__()
        self._stack = stack
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        rest = await stack.enter_async_context(
            httpx.AsyncClient(base_url=self.server.http, limits=limits, timeout=30)
        )

        async def rest_submit() -> None:
            r = await rest.post("/v1/tasks", json=SPEC)
            assert r.status_code == 202, r.text

        async def rest_noop() -> None:
            r = await rest.get("/healthz")
            assert r.status_code == 200, r.text

        self.calls["REST"] = (rest_submit, rest_noop)

        if self.server.grpc_target is not None:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(self.server.grpc_target))
            stub = pb_grpc.TaskServiceStub(channel)  # type: ignore[no-untyped-call]
            health = health_pb2_grpc.HealthStub(channel)
            request = pb.SubmitTaskRequest(spec=pb.TaskSpec(goal=SPEC["goal"], max_steps=SPEC["max_steps"]))
            check = health_pb2.HealthCheckRequest(service="")

            async def grpc_submit() -> None:
                await stub.SubmitTask(request, timeout=30)

            async def grpc_noop() -> None:
                await health.Check(check, timeout=30)

            self.calls["gRPC"] = (grpc_submit, grpc_noop)

        http2 = await stack.enter_async_context(httpx2.AsyncClient(timeout=30.0))
        mcp = await stack.enter_async_context(
            # mode="legacy": an initialize handshake and a session; the 2026-07-28 protocol the
            # default mode="auto" negotiates has no ping.
            Client(streamable_http_client(f"{self.server.http}/mcp", http_client=http2), mode="legacy")
        )

        async def mcp_submit() -> None:
            result = await mcp.call_tool("submit_task", dict(SPEC))
            assert not result.is_error, result

        async def mcp_noop() -> None:
            await mcp.send_ping()

        self.calls["MCP"] = (mcp_submit, mcp_noop)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)


Samples = dict[str, dict[str, list[list[float]]]]  # variant -> "REST submit" -> per-round samples


async def run_rounds(servers: list[Server], rounds: int, n: int, warmup: int) -> Samples:
    from contextlib import AsyncExitStack

    samples: Samples = {s.name: {} for s in servers}
    async with AsyncExitStack() as stack:
        doors = [await stack.enter_async_context(Doors(s)) for s in servers]
        for d in doors:  # warm connections, caches and every lazy import on both ends
            for submit, noop in d.calls.values():
                await pairs(submit, noop, warmup)
        for r in range(rounds):
            order = doors if r % 2 == 0 else doors[::-1]
            for d in order:
                for door, (submit, noop) in d.calls.items():
                    subs, noops = await pairs(submit, noop, n)
                    samples[d.server.name].setdefault(f"{door} submit", []).append(subs)
                    samples[d.server.name].setdefault(f"{door} noop", []).append(noops)
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return samples


def report(servers: list[Server], samples: Samples, rounds: int, n: int, store: str) -> None:
    print(machine_line())
    print(
        f"store {store}; {rounds} interleaved rounds x {n} alternating submit/no-op pairs per door per "
        "server, one kept-alive connection per door; figures are min/median/max over rounds.\n"
    )
    print(
        "| server | loaded | door | submit | no-op | submit p50 ms | no-op p50 ms | submit p99 ms "
        "| no-op p99 ms | p50 ratio (target <= 2) |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for s in servers:
        loaded = ", ".join(k for k, v in s.loaded.items() if v) or "neither"
        for door in DOORS:
            key_s, key_n = f"{door} submit", f"{door} noop"
            if key_s not in samples[s.name]:
                continue
            subs, noops = samples[s.name][key_s], samples[s.name][key_n]
            p50s = [statistics.median(x) for x in subs]
            p50n = [statistics.median(x) for x in noops]
            p99s = [pct(x, 0.99) for x in subs]
            p99n = [pct(x, 0.99) for x in noops]
            ratios = [a / b for a, b in zip(p50s, p50n, strict=True)]
            label_s, label_n = DOOR_LABELS[door]
            print(
                f"| {s.name} | {loaded} | {door} | {label_s} | {label_n} | {spread(p50s)} | {spread(p50n)} "
                f"| {spread(p99s)} | {spread(p99n)} | {spread(ratios)} |"
            )
    names = [s.name for s in servers]
    if "installed" in names:
        print("\nper-round ratio of each server's p50 to installed's in the same round (min/median/max):\n")
        print("| server | door | submit | no-op |")
        print("|---|---|---:|---:|")
        base = samples["installed"]
        for s in servers:
            if s.name == "installed":
                continue
            for door in DOORS:
                if f"{door} submit" not in samples[s.name]:
                    continue
                cells = []
                for kind in ("submit", "noop"):
                    mine = [statistics.median(x) for x in samples[s.name][f"{door} {kind}"]]
                    ref = [statistics.median(x) for x in base[f"{door} {kind}"]]
                    cells.append(spread([a / b for a, b in zip(mine, ref, strict=True)]))
                print(f"| {s.name} | {door} | {cells[0]} | {cells[1]} |")


# -- the harness: cmd_serve's body with a socket (and a loop) of our choosing ----------------------


def harness(config_path: str, options_json: str) -> None:
    """``opspawn-mcp serve`` minus ``bind_http``: the runtime on a socket made with ``proto`` and,
    with ``loop == "uvloop"``, on uvloop. Same ``_serve`` coroutine, same config."""
    import logging

    from opspawn_mcp.cli import _serve
    from opspawn_mcp.config import load_config

    options = json.loads(options_json)
    config = load_config(Path(config_path))
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpx2", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    host, port = config.opspawn.server.host, config.opspawn.server.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, int(options.get("proto", socket.IPPROTO_TCP)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    if options.get("loop") == "uvloop":
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    args = argparse.Namespace(host=host, port=port, stdio=False)
    try:
        asyncio.run(_serve(config, args, sock))
    finally:
        sock.close()


def store_url_for(kind: str, directory: Path, name: str) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{directory / (name + '.db')}"
    raise SystemExit(f"unknown store {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=200, help="submit/no-op pairs per door per round")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument(
        "--standard", metavar="DIR", help="a dir with httptools + uvloop for the standard variants"
    )
    parser.add_argument("--no-proto0", action="store_true", help="skip the old-bind A/B server")
    parser.add_argument("--harness", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.harness:
        harness(*args.harness)
        return
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3")
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opspawn-doors-")))
        llm = stack.enter_context(black_hole())
        specs: list[tuple[str, dict[str, Any]]] = [("installed", {})]
        if not args.no_proto0:
            specs.append(("proto0", {"harness": {"proto": 0}}))
        if args.standard:
            site = str(Path(args.standard).resolve())
            specs.append(("standard", {"extra_path": site}))
            specs.append(("standard+uvloop", {"extra_path": site, "harness": {"loop": "uvloop"}}))
        servers: list[Server] = []
        try:
            for name, options in specs:
                url = store_url_for(args.store, directory, name)
                servers.append(start_server(name, directory, llm, url, **options))
            for s in servers:
                wait_ready(s)
                s.loaded = loaded_modules(s.proc.pid)
            samples = asyncio.run(run_rounds(servers, args.rounds, args.n, args.warmup))
        finally:
            for s in servers:
                stop_server(s)
        report(servers, samples, args.rounds, args.n, args.store)


if __name__ == "__main__":
    main()
