"""The exposed view's rules against the real testing server over stdio: a principal sees and calls
only its allowed servers, a tool under ``require_approval`` is refused naming submit_task, and the
first listing of a server reaches the bus as ``tools/list_changed``."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged

from opspawn_mcp.errors import Forbidden
from opspawn_mcp.exposed import ExposedTools
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.principals import Principal
from tests.servers.harness import HANG_GUARD_S, stdio_config

BOB = Principal("bob", servers=frozenset({"alpha"}))


def _pool(tmp_path: Path) -> OpsMcpClient:
    exposed = stdio_config(tmp_path).model_copy(update={"expose": True})
    return OpsMcpClient(
        {
            "alpha": exposed,
            "beta": exposed.model_copy(update={"require_approval": ["echo"]}),
            "hidden": stdio_config(tmp_path),
        },
        eager=True,
    )


async def test_a_principal_sees_and_reaches_only_its_servers(tmp_path: Path) -> None:
    async with _pool(tmp_path) as pool:
        view = ExposedTools(pool, InMemorySubscriptionBus())
        assert view.servers == ["alpha", "beta"]
        names = {tool.name for tool in view.list_tools(BOB)}
        assert "alpha__echo" in names and not any(n.startswith(("beta__", "hidden__")) for n in names)
        assert view.route("alpha__echo", BOB) == ("alpha", "echo")
        assert view.route("beta__echo", BOB) is None
        assert view.route("hidden__echo", Principal("admin", admin=True)) is None


async def test_a_tool_needing_approval_is_refused_naming_submit_task(tmp_path: Path) -> None:
    async with _pool(tmp_path) as pool:
        view = ExposedTools(pool, InMemorySubscriptionBus())
        with pytest.raises(Forbidden) as refused:
            await view.call("beta", "echo", {"text": "x"}, Principal("alice"))
        assert refused.value.message == (
            "The tool beta/echo needs a person's approval (mcpServers.beta.require_approval), and a "
            "direct call has no task to wait in. Ask an agent to call it in a task with submit_task; "
            "the task waits for the approval."
        )
        assert next(s for s in pool.servers_info() if s.name == "beta").calls == 0


async def test_a_server_coming_up_is_announced_on_the_bus(tmp_path: Path) -> None:
    bus = InMemorySubscriptionBus()
    events: list[object] = []
    arrived = anyio.Event()

    def on_event(event: object) -> None:
        events.append(event)
        arrived.set()

    bus.subscribe(on_event)
    pool = OpsMcpClient({"alpha": stdio_config(tmp_path).model_copy(update={"expose": True})})
    ExposedTools(pool, bus)
    async with pool:
        await pool.open_all()
        with anyio.fail_after(HANG_GUARD_S):
            await arrived.wait()
    assert events == [ToolsListChanged()]
