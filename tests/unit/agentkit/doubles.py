"""What agentkit's tests share: an MCP caller over real in-process ``mcp.Client`` sessions and a
recorder of agent events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import mcp.types as types
from mcp import Client
from mcp.server.mcpserver import MCPServer

from agentkit import AgentEvent, ProgressCallback


@dataclass(frozen=True)
class SentCall:
    """One ``call_tool`` as the tools made it."""

    server: str
    tool: str
    arguments: dict[str, Any]
    meta: dict[str, Any] | None
    progress_callback: ProgressCallback | None


class SessionCaller:
    """A real ``McpCaller`` over one ``mcp.Client`` session per server name, with an allow-list like
    a host's (default: every server it has a session for). It forwards the keywords the tools pass
    (``progress_callback``, ``meta``) and records every call in ``calls``."""

    def __init__(self, clients: Mapping[str, Client], allowed: Collection[str] | None = None) -> None:
        self.clients = clients
        self.allowed = set(clients) if allowed is None else set(allowed)
        self.calls: list[SentCall] = []

    def targets(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(server, tool, arguments)`` of each call so far."""
        return [(c.server, c.tool, c.arguments) for c in self.calls]

    def _client(self, server: str) -> Client:
        if server not in self.allowed:
            raise PermissionError(f"server {server!r} is not allowed for this task.")
        return self.clients[server]

    async def list_tools(self, server: str) -> list[types.Tool]:
        return list((await self._client(server).list_tools()).tools)

    async def call_tool(
        self, server: str, tool: str, arguments: dict[str, Any], **options: Any
    ) -> types.CallToolResult:
        client = self._client(server)
        self.calls.append(
            SentCall(server, tool, arguments, options.get("meta"), options.get("progress_callback"))
        )
        return await client.call_tool(tool, arguments, **options)


@asynccontextmanager
async def open_caller(
    servers: Mapping[str, MCPServer], allowed: Collection[str] | None = None
) -> AsyncIterator[SessionCaller]:
    """A ``SessionCaller`` with a session on each of ``servers``, opened in the test's own task (anyio
    scopes must be exited where they were entered)."""
    async with AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(Client(server)) for name, server in servers.items()}
        yield SessionCaller(clients, allowed)


class Recorder:
    """An ``on_event`` callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[AgentEvent] = []

    async def __call__(self, event: AgentEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def progress(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.kind == "progress"]
