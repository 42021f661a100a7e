"""The exposed view's rules against the real testing server over stdio: a principal sees and calls
only its allowed servers (tools, resources, prompts), a tool under ``require_approval`` is refused
naming submit_task, resources and prompts are namespaced and read through the pool, and a server
coming up reaches the bus as each kind's ``list_changed``."""

from __future__ import annotations

from pathlib import Path

import anyio
import mcp.types as types
import pytest
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    PromptsListChanged,
    ResourcesListChanged,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError

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
    assert events == [ToolsListChanged(), ResourcesListChanged(), PromptsListChanged()]


async def test_resources_and_templates_are_namespaced_by_server_and_read_through_the_pool(
    tmp_path: Path,
) -> None:
    async with _pool(tmp_path) as pool:
        view = ExposedTools(pool, InMemorySubscriptionBus())
        assert [r.uri for r in view.list_resources(BOB)] == ["opspawn+server://alpha/testing://greeting"]
        assert {r.uri for r in view.list_resources(Principal("alice"))} == {
            "opspawn+server://alpha/testing://greeting",
            "opspawn+server://beta/testing://greeting",
        }
        [template] = view.list_resource_templates(BOB)
        assert template.uri_template == "opspawn+server://alpha/testing://items/{item}"
        assert template.description == "[alpha] One item by name."
        target = view.route_uri("opspawn+server://alpha/testing://items/box", BOB)
        assert target == ("alpha", "testing://items/box")
        read = await view.read_resource(*target, BOB)
        [content] = read.contents
        assert isinstance(content, types.TextResourceContents)
        assert (content.uri, content.text) == ("opspawn+server://alpha/testing://items/box", "item box")
        assert view.route_uri("opspawn+server://beta/testing://greeting", BOB) is None
        assert view.route_uri("opspawn+server://hidden/testing://greeting", Principal("alice")) is None
        with pytest.raises(MCPError) as missing:
            await view.read_resource("alpha", "testing://nothing", BOB)
        assert missing.value.message.startswith("MCP server 'alpha' answered: ")


async def test_prompts_are_named_like_tools_and_got_through_the_pool(tmp_path: Path) -> None:
    async with _pool(tmp_path) as pool:
        view = ExposedTools(pool, InMemorySubscriptionBus())
        [prompt] = view.list_prompts(BOB)
        assert (prompt.name, prompt.description) == ("alpha__greet", "[alpha] Ask for a greeting.")
        assert view.route_prompt("beta__greet", BOB) is None
        target = view.route_prompt("alpha__greet", BOB)
        assert target == ("alpha", "greet")
        got = await view.get_prompt(*target, {"name": "Ann"}, BOB)
        [message] = got.messages
        assert isinstance(message.content, types.TextContent) and message.content.text == "Say hello to Ann."
