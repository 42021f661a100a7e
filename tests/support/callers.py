"""MCP callers for agentkit's tests, over a real in-memory ``mcp.Client`` session."""

from __future__ import annotations

from typing import Any

import mcp.types as types
from mcp import Client


class OldCaller:
    """A caller written before agentkit's optional keywords (``progress_callback``, ``meta``):
    the MCP tools must keep working with it, only without progress or idempotency keys."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def list_tools(self, server: str) -> list[types.Tool]:
        return list((await self.client.list_tools()).tools)

    async def call_tool(self, server: str, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        return await self.client.call_tool(tool, arguments)
