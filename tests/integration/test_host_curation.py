"""Tool curation in the host pool against the real testing server over stdio: agents see and may
call only what ``mcpServers.X.tools`` shows, and ``servers_info`` says what is hidden and why."""

from __future__ import annotations

from pathlib import Path

import pytest

import agentkit
from agentkit import ToolError
from opspawn_mcp.config import ToolFilter
from opspawn_mcp.errors import Forbidden
from opspawn_mcp.host import OpsMcpClient, ServerInfo
from opspawn_mcp.host.models import HiddenTool
from tests.servers.harness import stdio_config, wait_until


def _info(pool: OpsMcpClient) -> ServerInfo:
    return next(info for info in pool.servers_info() if info.name == "t")


def _curated(tmp_path: Path, **tools: list[str]) -> OpsMcpClient:
    config = stdio_config(tmp_path).model_copy(update={"tools": ToolFilter.model_validate(tools)})
    return OpsMcpClient({"t": config})


async def test_excluded_tools_are_neither_listed_nor_given_to_agents(tmp_path: Path) -> None:
    async with _curated(tmp_path, exclude=["crash", "fail*"]) as pool:
        listed = {tool.name for tool in await pool.list_tools("t")}
        assert {"echo", "pid"} <= listed and not {"crash", "fail"} & listed
        flat = {tool.name for tool in await agentkit.expand_server_tools(pool.scoped(["t"]), ["t"])}
        assert "t__echo" in flat and "t__crash" not in flat and "t__fail" not in flat
        info = _info(pool)
        assert info.tools == [tool.name for tool in await pool.list_tools("t")]
        assert info.tool_count == len(info.tools)
        assert sorted(info.hidden, key=lambda h: h.name) == [
            HiddenTool(name="crash", reason="excluded by 'crash'"),
            HiddenTool(name="fail", reason="excluded by 'fail*'"),
        ]
        assert info.unmatched == []


@pytest.mark.parametrize("scoped", [False, True])
async def test_a_hidden_tool_is_refused_before_any_io_naming_the_filter(tmp_path: Path, scoped: bool) -> None:
    async with _curated(tmp_path, exclude=["crash"]) as pool:
        caller = pool.scoped(["t"]) if scoped else pool
        with pytest.raises(ToolError) as refused:
            await caller.call_tool("t", "crash", {})
        assert isinstance(refused.value.__cause__, Forbidden)
        assert refused.value.message.startswith(
            "The tool t/crash is hidden by mcpServers.t.tools (excluded by 'crash'), so it cannot be called"
        )
        assert "the list_servers tool" in refused.value.message
        info = _info(pool)
        assert (info.state, info.calls, info.errors) == ("idle", 0, 0)  # the server was never started


async def test_include_applies_to_tools_the_server_adds_later(tmp_path: Path) -> None:
    async with _curated(tmp_path, include=["echo", "add_tool", "ehco"]) as pool:
        assert {tool.name for tool in await pool.list_tools("t")} == {"echo", "add_tool"}
        assert _info(pool).unmatched == ["ehco"]
        await pool.call_tool("t", "add_tool", {"name": "echo_later"})
        await wait_until(
            lambda: any(h.name == "echo_later" for h in _info(pool).hidden), "the refreshed list"
        )
        assert {tool.name for tool in await pool.list_tools("t")} == {"echo", "add_tool"}
        hidden = next(h for h in _info(pool).hidden if h.name == "echo_later")
        assert hidden.reason == "not included by 'echo', 'add_tool', 'ehco'"
