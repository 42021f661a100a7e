"""OpsMcpClient against the testing server over real HTTP (uvicorn on 127.0.0.1): SSE and streamable HTTP."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Literal

import anyio
import mcp.types as types
import pytest

from agentkit import IDEMPOTENCY_META_KEY, ToolError
from opspawn_mcp.errors import Unavailable
from opspawn_mcp.host import OpsMcpClient, ServerInfo
from tests.servers.harness import HttpServer, is_alive, lines, started_pids, wait_until, wait_until_async
from tests.support.callers import call_fails

Transport = Literal["sse", "streamable-http"]
pytestmark = pytest.mark.parametrize("transport", ["sse", "streamable-http"])


def _text(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


def _info(pool: OpsMcpClient, name: str) -> ServerInfo:
    return next(info for info in pool.servers_info() if info.name == name)


async def test_concurrent_calls_share_one_session(tmp_path: Path, transport: Transport) -> None:
    async with HttpServer(transport, tmp_path) as server, OpsMcpClient({"h": server.config()}) as pool:
        results: list[str] = []

        async def call(i: int) -> None:
            results.append(_text(await pool.call_tool("h", "echo", {"text": f"m{i}"})))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(call, i)
        assert sorted(results) == sorted(f"m{i}" for i in range(20))
        info = _info(pool, "h")
        assert (info.state, info.transport, info.calls, info.errors) == ("ready", transport, 20, 0)
        with pytest.raises(ToolError) as failed:
            await pool.call_tool("h", "fail", {"message": "bad input"})
        assert failed.value.message == "The tool h/fail reported an error: bad input"


async def test_dropped_server_is_detected_and_reconnected(tmp_path: Path, transport: Transport) -> None:
    async with HttpServer(transport, tmp_path) as server, OpsMcpClient({"h": server.config()}) as pool:
        first = int(_text(await pool.call_tool("h", "pid", {})))
        with call_fails(Unavailable) as caught:
            await pool.call_tool("h", "crash", {})
        assert "'h'" in caught.value.message
        await wait_until(lambda: not is_alive(first), "server process gone")
        await server.stop()
        # While it is down, calls fail with a clear error instead of hanging.
        with call_fails(Unavailable):
            await pool.call_tool("h", "pid", {})
        await server.start()

        async def answers() -> bool:
            try:
                await pool.call_tool("h", "pid", {})
            except ToolError:
                return False
            return True

        await wait_until_async(answers)
        second = int(_text(await pool.call_tool("h", "pid", {})))
        assert second != first and started_pids(tmp_path) == [first, second]
        assert _info(pool, "h").state == "ready"


async def test_timeout_cancels_the_call_on_the_server(tmp_path: Path, transport: Transport) -> None:
    async with (
        HttpServer(transport, tmp_path) as server,
        OpsMcpClient({"h": server.config(timeout_s=1)}) as pool,
    ):
        await pool.call_tool("h", "echo", {"text": "warm"})
        with call_fails(Unavailable) as caught:
            await pool.call_tool("h", "sleep", {"seconds": 60, "tag": "slow"})
        assert "did not answer 'sleep' within 1s; the call was cancelled" in caught.value.message
        await wait_until(lambda: "cancelled slow" in lines(tmp_path / "cancels"), "server saw the cancel")
        assert _text(await pool.call_tool("h", "echo", {"text": "after"})) == "after"


async def test_a_frozen_server_is_marked_unhealthy_and_reconnected(
    tmp_path: Path, transport: Transport
) -> None:
    """A SIGSTOPped HTTP server still accepts TCP connections, so only timeouts show the freeze;
    after two in a row the session is dropped and, once the server runs again, a new one opens."""
    async with (
        HttpServer(transport, tmp_path) as server,
        OpsMcpClient({"h": server.config(timeout_s=1)}) as pool,
    ):
        assert server.process is not None
        pid = server.process.pid
        assert int(_text(await pool.call_tool("h", "pid", {}))) == pid
        os.kill(pid, signal.SIGSTOP)
        try:
            for text in ("one", "two"):
                with call_fails(Unavailable) as caught:
                    await pool.call_tool("h", "echo", {"text": text})
                assert "MCP server 'h' did not answer 'echo' within 1s" in caught.value.message
            assert "unhealthy" in caught.value.message and "reconnects" in caught.value.message
            info = _info(pool, "h")
            assert info.state == "unhealthy"
            assert info.last_error and "2 calls in a row did not answer within 1s" in info.last_error
        finally:
            os.kill(pid, signal.SIGCONT)
        assert _text(await pool.call_tool("h", "echo", {"text": "back"})) == "back"
        assert _info(pool, "h").state == "ready"
        assert started_pids(tmp_path) == [pid]


async def test_meta_reaches_the_server(tmp_path: Path, transport: Transport) -> None:
    async with HttpServer(transport, tmp_path) as server, OpsMcpClient({"h": server.config()}) as pool:
        key = {IDEMPOTENCY_META_KEY: "task-9:1:2"}
        seen = json.loads(_text(await pool.call_tool("h", "echo_meta", {}, meta=key)))
        assert seen[IDEMPOTENCY_META_KEY] == "task-9:1:2"  # beside a trace context, if a tracer is installed


async def test_list_changed_refreshes_the_catalogue(tmp_path: Path, transport: Transport) -> None:
    async with HttpServer(transport, tmp_path) as server, OpsMcpClient({"h": server.config()}) as pool:
        assert "late_tool" not in {tool.name for tool in await pool.list_tools("h")}
        await pool.call_tool("h", "add_tool", {"name": "late_tool"})
        await wait_until(lambda: "late_tool" in _info(pool, "h").tools, "catalogue refreshed")
        assert _text(await pool.call_tool("h", "late_tool", {"text": "x"})) == "late_tool: x"


async def test_headers_with_secrets_are_sent(
    tmp_path: Path, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSPAWN_TEST_HTTP_TOKEN", "tok-123456")
    async with HttpServer(transport, tmp_path) as server:
        config = server.config(headers={"Authorization": "Bearer ${OPSPAWN_TEST_HTTP_TOKEN}"})
        async with OpsMcpClient({"h": config}) as pool:
            sent = await pool.call_tool("h", "header", {"name": "authorization"})
            assert _text(sent) == "Bearer tok-123456"
        assert config.headers["Authorization"] == "Bearer ${OPSPAWN_TEST_HTTP_TOKEN}"


async def test_nothing_listening_is_unavailable(tmp_path: Path, transport: Transport) -> None:
    server = HttpServer(transport, tmp_path)  # never started: the port is closed
    async with OpsMcpClient({"h": server.config()}) as pool:
        with pytest.raises(Unavailable) as caught:
            await pool.list_tools("h")
        assert "'h'" in caught.value.message
        assert _info(pool, "h").last_error
