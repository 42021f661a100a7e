"""OpsMcpClient against servers we did not write: PyPI mcp-server-time and npm server-everything
(its tools, and its resources, templates and prompts through opspawn's exposed view)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import anyio
import mcp.types as types
import pytest
from mcp.server.subscriptions import InMemorySubscriptionBus

from agentkit import ToolError
from opspawn_mcp.config import StdioServerConfig
from opspawn_mcp.exposed import ExposedTools
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.principals import Principal
from tests.servers.harness import HttpServer, free_port
from tests.support.services import require_command, unavailable

EVERYTHING = "mcp-server-everything"
"""npm's @modelcontextprotocol/server-everything; `make test` installs it into tests/node and puts its
bin folder on PATH, so no test downloads anything."""
NODE_TIMEOUT_S = 60.0


def _text(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def test_mcp_server_time_over_stdio() -> None:
    if importlib.util.find_spec("mcp_server_time") is None:
        unavailable("the PyPI package mcp-server-time (pip install mcp-server-time)")
    config = StdioServerConfig(command=sys.executable, args=["-m", "mcp_server_time"])
    async with OpsMcpClient({"time": config}) as pool:
        names = {tool.name for tool in await pool.list_tools("time")}
        assert {"get_current_time", "convert_time"} <= names
        now = await pool.call_tool("time", "get_current_time", {"timezone": "UTC"})
        assert not now.is_error and "UTC" in _text(now)
        with pytest.raises(ToolError) as bad:
            await pool.call_tool("time", "get_current_time", {"timezone": "Not/AZone"})
        assert bad.value.message.startswith("The tool time/get_current_time reported an error: ")
        info = pool.servers_info()[0]
        assert (info.state, info.calls, info.errors) == ("ready", 2, 1)


@pytest.mark.node
async def test_server_everything_over_stdio() -> None:
    everything = require_command(EVERYTHING)
    config = StdioServerConfig(command=everything, timeout_s=NODE_TIMEOUT_S)
    async with OpsMcpClient({"everything": config}) as pool:
        names = {tool.name for tool in await pool.list_tools("everything")}
        assert {"echo", "get-sum"} <= names
        results: list[str] = []

        async def call(i: int) -> None:
            results.append(_text(await pool.call_tool("everything", "echo", {"message": f"m{i}"})))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(call, i)
        assert len(results) == 10 and all(f"m{i}" in " ".join(results) for i in range(10))
        total = await pool.call_tool("everything", "get-sum", {"a": 2, "b": 40})
        assert "42" in _text(total)


@pytest.mark.node
async def test_server_everything_over_streamable_http(tmp_path: Path) -> None:
    everything = require_command(EVERYTHING)
    port = free_port()
    server = HttpServer(
        "streamable-http",
        tmp_path,
        command=[everything, "streamableHttp"],
        port=port,
        env={"PORT": str(port)},
    )
    async with server, OpsMcpClient({"everything": server.config(timeout_s=NODE_TIMEOUT_S)}) as pool:
        names = {tool.name for tool in await pool.list_tools("everything")}
        assert {"echo", "get-sum"} <= names
        echoed = await pool.call_tool("everything", "echo", {"message": "over http"})
        assert "over http" in _text(echoed)
        assert pool.servers_info()[0].state == "ready"


@pytest.mark.node
async def test_server_everything_resources_and_prompts_through_the_exposed_view() -> None:
    everything = require_command(EVERYTHING)
    config = StdioServerConfig(command=everything, timeout_s=NODE_TIMEOUT_S, expose=True)
    alice = Principal("alice")
    async with OpsMcpClient({"everything": config}, eager=True) as pool:
        view = ExposedTools(pool, InMemorySubscriptionBus())
        doc = "opspawn+server://everything/demo://resource/static/document/architecture.md"
        assert doc in {r.uri for r in view.list_resources(alice)}
        assert "opspawn+server://everything/demo://resource/dynamic/text/{resourceId}" in {
            t.uri_template for t in view.list_resource_templates(alice)
        }
        target = view.route_uri("opspawn+server://everything/demo://resource/dynamic/text/7", alice)
        assert target == ("everything", "demo://resource/dynamic/text/7")
        read = await view.read_resource(*target, alice)
        assert [c.uri for c in read.contents] == [
            "opspawn+server://everything/demo://resource/dynamic/text/7"
        ]
        assert {"everything__simple-prompt", "everything__args-prompt"} <= {
            p.name for p in view.list_prompts(alice)
        }
        got = await view.get_prompt("everything", "args-prompt", {"city": "Lyon"}, alice)
        assert "Lyon" in " ".join(getattr(m.content, "text", "") for m in got.messages)
