"""mcp_proxy_tool and expand_server_tools against real in-process MCP servers (mcp.Client)."""

from __future__ import annotations

import base64
from contextlib import AbstractAsyncContextManager

import mcp.types as types
import pytest
from mcp.server.mcpserver import MCPServer

from agentkit import Agent, McpCaller, RunStatus, expand_server_tools, mcp_proxy_tool, result_from_mcp
from agentkit.llm import ScriptedLLM, call
from tests.unit.agentkit import doubles
from tests.unit.agentkit.doubles import SessionCaller

PNG = base64.b64encode(b"\x89PNG fake image bytes").decode()

files = MCPServer("files", log_level="WARNING")
maths = MCPServer("maths", log_level="WARNING")


@files.tool(description="Return the text unchanged.")
def echo(text: str) -> str:
    return text


@files.tool(description="Everything MCP content can hold.")
def rich() -> types.CallToolResult:
    return types.CallToolResult(
        content=[
            types.TextContent(type="text", text="a caption"),
            types.ImageContent(type="image", data=PNG, mime_type="image/png"),
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri="file:///notes.txt", mime_type="text/plain", text="note body"
                ),
            ),
            types.EmbeddedResource(
                type="resource",
                resource=types.BlobResourceContents(
                    uri="file:///data.bin", blob="AAAA", mime_type="application/x"
                ),
            ),
            types.ResourceLink(
                type="resource_link", name="report", uri="file:///report.pdf", description="the report"
            ),
        ]
    )


@files.tool(description="Fail on purpose.")
def fail(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


@maths.tool(description="Add two numbers.")
def add(a: int, b: int) -> int:
    return a + b


def open_caller() -> AbstractAsyncContextManager[SessionCaller]:
    return doubles.open_caller({"files": files, "maths": maths, "secret": maths}, allowed={"files", "maths"})


def test_the_test_caller_satisfies_the_protocol() -> None:
    assert isinstance(SessionCaller({}), McpCaller)


async def test_proxy_calls_the_named_server_and_tool() -> None:
    async with open_caller() as caller:
        proxy = mcp_proxy_tool(caller)
        assert proxy.name == "mcp_proxy_tool"
        assert set(proxy.parameters["properties"]) == {"server", "tool", "arguments"}
        result = await proxy.invoke({"server": "maths", "tool": "add", "arguments": {"a": 2, "b": 40}})
        assert not result.is_error and result.content == "42"
        assert caller.targets() == [("maths", "add", {"a": 2, "b": 40})]
        # Arguments sent as a JSON string (small models do this) are accepted too.
        result = await proxy.invoke({"server": "files", "tool": "echo", "arguments": '{"text": "hi"}'})
        assert result.content == "hi"


async def test_proxy_turns_host_refusals_and_bad_input_into_observations() -> None:
    async with open_caller() as caller:
        proxy = mcp_proxy_tool(caller)
        refused = await proxy.invoke({"server": "secret", "tool": "add", "arguments": {"a": 1, "b": 1}})
        # A caller's own exception is said once, with where it happened: no further prefixes, one period.
        assert refused.is_error and refused.content == (
            "Calling 'add' on MCP server 'secret' failed: PermissionError: "
            "server 'secret' is not allowed for this task."
        )
        missing = await proxy.invoke({"tool": "add"})
        assert missing.is_error and missing.content == (
            'mcp_proxy_tool needs "server" and "tool" as non-empty strings and "arguments" as an object.'
        )
        bad = await proxy.invoke({"server": "maths", "tool": "add", "arguments": "{nope"})
        assert (
            bad.is_error
            and bad.content == "\"arguments\" of mcp_proxy_tool must be a JSON object, got '{nope'."
        )


async def test_mcp_content_maps_to_observations_without_loss() -> None:
    async with open_caller() as caller:
        result = await mcp_proxy_tool(caller).invoke({"server": "files", "tool": "rich", "arguments": {}})
        assert not result.is_error
        text = result.content
        assert "a caption" in text
        assert "[image image/png" in text
        assert "[resource file:///notes.txt (text/plain)]\nnote body" in text
        assert "[binary resource file:///data.bin (application/x), 4 base64 characters]" in text
        assert "[resource link file:///report.pdf: the report]" in text
        kinds = [p["type"] for p in result.parts]
        assert kinds == ["text", "image", "resource", "resource", "resource_link"]
        assert result.parts[1]["data"] == PNG and result.parts[1]["mimeType"] == "image/png"
        assert result.parts[3]["resource"]["blob"] == "AAAA"


async def test_is_error_and_structured_content_are_kept() -> None:
    async with open_caller() as caller:
        failed = await mcp_proxy_tool(caller).invoke(
            {"server": "files", "tool": "fail", "arguments": {"message": "boom"}}
        )
        assert failed.is_error and failed.content == "The tool files/fail reported an error: boom"
        assert failed.parts == [{"type": "text", "text": "boom"}]
        structured = result_from_mcp(types.CallToolResult(content=[], structured_content={"temperature": 21}))
        assert structured.content == '{"temperature": 21}' and structured.structured == {"temperature": 21}


async def test_expand_server_tools_gives_flat_tools_with_downstream_schemas() -> None:
    async with open_caller() as caller:
        tools = await expand_server_tools(caller, ["files", "maths", "secret"])
        names = sorted(t.name for t in tools)
        assert names == [
            "files__echo",
            "files__fail",
            "files__rich",
            "maths__add",
        ]  # "secret" is refused, left out
        flat_add = next(t for t in tools if t.name == "maths__add")
        assert set(flat_add.parameters["properties"]) == {"a", "b"}
        assert flat_add.parameters["required"] == ["a", "b"]
        assert "Add two numbers." in flat_add.description
        result = await flat_add.invoke({"a": 1, "b": 2})
        assert result.content == "3"
        assert caller.targets()[-1] == ("maths", "add", {"a": 1, "b": 2})
        missing = await flat_add.invoke({"a": 1})
        assert missing.is_error and missing.content.startswith(
            "Missing required argument(s) b for maths/add; send arguments matching its schema: {"
        )


async def test_expand_server_tools_strict_reraises() -> None:
    async with open_caller() as caller:
        with pytest.raises(PermissionError):
            await expand_server_tools(caller, ["secret"], strict=True)


async def test_an_agent_uses_flat_and_proxy_tools() -> None:
    async with open_caller() as caller:
        tools = [*await expand_server_tools(caller, ["files"]), mcp_proxy_tool(caller)]
        llm = ScriptedLLM(
            [
                call("files__echo", text="ping"),
                call("mcp_proxy_tool", server="maths", tool="add", arguments={"a": 1, "b": 1}),
                "ping 2",
            ]
        )
        result = await Agent(llm, tools).run("echo ping and add 1+1")
        assert result.status is RunStatus.COMPLETED
        assert [r.content for s in result.steps for r in s.tool_results] == ["ping", "2"]
