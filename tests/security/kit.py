"""What the security tests share: a real ``opspawn-mcp serve``, a trap listener, a capturing
LLM, and one small client per door that reports refusals as data instead of raising.

Nothing here is a stand-in for the product: ``serve`` is the installed command in its own
process on free 127.0.0.1 ports (uvicorn + grpc.aio, embedded worker, SQLite store, the bundled
example MCP server); the LLM is the project's fake OpenAI-compatible server on a thread of the
test process, so the test can read every request it received (``raw_requests``); the trap is a
plain TCP listener that records every connection and byte. Waits poll with the harness's hang
guard as their only deadline; nothing asserts on durations.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import anyio
import grpc
import httpx
import httpx2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc
from tests.servers.harness import HANG_GUARD_S, REPO_ROOT, free_port, opspawn_process
from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, Reply
from tests.support.serve import deployment_env

EXAMPLE_SERVER = {"command": sys.executable, "args": ["-m", "opspawn_mcp.example_server"]}
TERMINAL = frozenset({"completed", "failed", "cancelled"})
TWICE = "call echo twice"
"""A goal that makes ``CapturingLLM`` call the echo tool twice in one reply (the tool budget)."""


# -- the listeners ----------------------------------------------------------------------------


class Trap:
    """A TCP listener on 127.0.0.1 that accepts anything and records every connection and byte.

    Whatever a client makes the server send here is a leak (an SSRF, a key sent to a URL the
    client chose); the tests assert it stays at zero connections.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.connections: list[bytearray] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def received(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c) for c in self.connections)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            data = bytearray()
            with self._lock:
                self.connections.append(data)
            threading.Thread(target=self._drain, args=(conn, data), daemon=True).start()

    def _drain(self, conn: socket.socket, data: bytearray) -> None:
        conn.settimeout(5)
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                with self._lock:
                    data += chunk

    def __enter__(self) -> Trap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._sock.close()


class CapturingLLM(FakeOpenAI):
    """The fake OpenAI server in rule mode (``echo X`` calls the echo tool, ``sleep N`` the sleep
    tool), plus: a goal containing ``TWICE`` gets one reply calling the echo tool twice."""

    def _next(self, body: dict[str, Any]) -> Reply | None:
        messages: list[dict[str, Any]] = body.get("messages") or []
        goal = next((str(m.get("content")) for m in messages if m.get("role") == "user"), "")
        names = [t.get("function", {}).get("name", "") for t in body.get("tools") or []]
        echo = next((n for n in names if n.endswith("echo")), None)
        called = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
        if TWICE in goal and echo and not called:
            calls = [{"name": echo, "arguments": {"text": text}} for text in ("one", "two")]
            return {"content": None, "tool_calls": calls}
        return super()._next(body)


@contextmanager
def capturing_llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(CapturingLLM()) as server:
        yield server


# -- the server process -----------------------------------------------------------------------


@dataclass(frozen=True)
class Serve:
    http: str
    grpc: str
    log: Path
    port: int
    config: Path

    @property
    def mcp(self) -> str:
        return f"{self.http}/mcp"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _wait_ready(proc: subprocess.Popen[bytes], serve: Serve) -> None:
    """Poll the open probes of another process; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the serve process exited: {serve.log_text()[-3000:]}")
        try:
            if httpx.get(f"{serve.http}/readyz", timeout=1).status_code == 200:
                with grpc.insecure_channel(serve.grpc) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
        except (httpx.HTTPError, grpc.RpcError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the serve process never became ready: {serve.log_text()[-3000:]}")
        time.sleep(0.05)


def write_serve_config(
    tmp: Path, opspawn: dict[str, Any], *, mcp_servers: dict[str, Any] | None = None
) -> Path:
    """``tmp/opspawn.json``: ``opspawn`` merged over a SQLite store beside it and the embedded
    broker; the bundled example server unless ``mcp_servers`` names others."""
    settings = {
        "store_url": f"sqlite+aiosqlite:///{tmp / 'opspawn.db'}",
        "broker_url": "embedded",
        **opspawn,
    }
    config = {
        "mcpServers": {"example": EXAMPLE_SERVER} if mcp_servers is None else mcp_servers,
        "opspawn": settings,
    }
    path = tmp / "opspawn.json"
    path.write_text(json.dumps(config))
    return path


@contextmanager
def run_serve(
    tmp: Path,
    opspawn: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    mcp_servers: dict[str, Any] | None = None,
) -> Iterator[Serve]:
    """``opspawn-mcp serve`` with HTTP and gRPC on free ports, configured by
    ``write_serve_config``; ``opspawn["server"]`` is merged over the host and ports. Its
    environment is a deployment's (``deployment_env``) plus ``env``."""
    http_port, grpc_port = free_port(), free_port()
    server = {"host": "127.0.0.1", "port": http_port, "grpc_port": grpc_port, **opspawn.get("server", {})}
    path = write_serve_config(tmp, {**opspawn, "server": server}, mcp_servers=mcp_servers)
    log = tmp / "serve.log"
    args = ("--config", str(path), "serve")
    with opspawn_process(*args, cwd=REPO_ROOT, env=deployment_env(**(env or {})), log=log) as proc:
        serve = Serve(
            http=f"http://127.0.0.1:{http_port}",
            grpc=f"127.0.0.1:{grpc_port}",
            log=log,
            port=http_port,
            config=path,
        )
        _wait_ready(proc, serve)
        yield serve


# -- the doors, refusals as data --------------------------------------------------------------


@dataclass
class McpAnswer:
    """A tool call's outcome: ``http_status`` is set when the transport itself refused."""

    is_error: bool
    text: str
    data: dict[str, Any] | None = None
    http_status: int | None = None

    @property
    def kind(self) -> str:
        return self.text.partition(": ")[0]


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def mcp_call(serve: Serve, token: str | None, tool: str, arguments: dict[str, Any]) -> McpAnswer:
    """Call one MCP tool over streamable HTTP in a fresh session."""
    statuses: list[int] = []

    async def record(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    try:
        async with (
            httpx2.AsyncClient(
                headers=_bearer(token),
                timeout=httpx2.Timeout(30.0, read=None),
                event_hooks={"response": [record]},
            ) as http,
            Client(streamable_http_client(serve.mcp, http_client=http)) as client,
        ):
            result = await client.call_tool(tool, arguments)
    except Exception as exc:
        refused = [s for s in statuses if s >= 400]
        if refused:
            return McpAnswer(True, str(exc), http_status=refused[0])
        raise
    text = "".join(getattr(block, "text", "") for block in result.content)
    text = text.removeprefix(f"Error executing tool {tool}: ")
    return McpAnswer(bool(result.is_error), text, result.structured_content)


async def mcp_read(serve: Serve, token: str | None, uri: str) -> McpAnswer:
    """Read one MCP resource; a refusal (an MCP error) is ``is_error`` with its message."""
    try:
        async with (
            httpx2.AsyncClient(headers=_bearer(token), timeout=30.0) as http,
            Client(streamable_http_client(serve.mcp, http_client=http)) as client,
        ):
            contents = await client.read_resource(uri)
    except Exception as exc:
        return McpAnswer(True, repr(exc))
    return McpAnswer(False, "".join(getattr(c, "text", "") for c in contents.contents))


def rest(serve: Serve, token: str | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=serve.http, headers=_bearer(token), timeout=httpx.Timeout(30, read=None)
    )


@dataclass
class GrpcAnswer:
    reply: Any = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    trailing: dict[str, str] = field(default_factory=dict)


class GrpcDoor:
    """The generated stub on one channel (``async with`` closes it); ``call`` returns the reply
    or the status as data."""

    def __init__(self, serve: Serve) -> None:
        self.channel = grpc.aio.insecure_channel(serve.grpc)
        self.stub = pb_grpc.TaskServiceStub(self.channel)  # type: ignore[no-untyped-call]

    async def call(self, method: str, request: Any, token: str | None) -> GrpcAnswer:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            reply = await getattr(self.stub, method)(request, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return _grpc_error(exc)
        return GrpcAnswer(reply)

    async def watch(self, task_id: str, token: str | None) -> GrpcAnswer:
        """All of WatchTask's events (the task must end), or the status that refused it."""
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        events: list[Any] = []
        try:
            async for event in self.stub.WatchTask(pb.WatchTaskRequest(task_id=task_id), metadata=metadata):
                events.append(event)
        except grpc.aio.AioRpcError as exc:
            return _grpc_error(exc)
        return GrpcAnswer(events)

    async def submit_raw(self, payload: bytes, token: str | None) -> GrpcAnswer:
        """SubmitTask with a request body written byte by byte: fields the proto no longer has."""
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        call = self.channel.unary_unary(
            "/opspawn.v1.TaskService/SubmitTask",
            request_serializer=lambda b: b,
            response_deserializer=pb.Task.FromString,
        )
        try:
            return GrpcAnswer(await call(payload, metadata=metadata))
        except grpc.aio.AioRpcError as exc:
            return _grpc_error(exc)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _grpc_error(exc: grpc.aio.AioRpcError) -> GrpcAnswer:
    trailing = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    return GrpcAnswer(None, exc.code(), exc.details() or "", trailing)


def field_bytes(number: int, payload: bytes | str) -> bytes:
    """One length-delimited protobuf field (wire type 2), encoded by hand."""
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def grpc_status_name(task: pb.Task) -> str:
    return pb.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_").lower()


async def wait_done(serve: Serve, token: str | None, task_id: str) -> dict[str, Any]:
    """Poll the task over REST until it ends; the hang guard is the only deadline."""
    async with rest(serve, token) as client:
        with anyio.fail_after(HANG_GUARD_S):
            while True:
                r = await client.get(f"/v1/tasks/{task_id}")
                assert r.status_code == 200, r.text
                task: dict[str, Any] = r.json()
                if task["status"] in TERMINAL:
                    return task
                await anyio.sleep(0.05)
