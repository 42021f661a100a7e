"""Downstream tools, resources and prompts on opspawn's own MCP server (``mcpServers.X.expose``).

Names, access by principal, the approval refusal, progress, cancellation and the audit, all
through the shared host pool. See docs/composition.md, "Aggregated tools".
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import mcp.types as types
from mcp.server.session import ServerSession
from mcp.server.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    SubscriptionBus,
    ToolsListChanged,
)
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError

from agentkit.errors import ToolError
from opspawn_mcp.audit import AuditTrail, ExposedRequest, Keep
from opspawn_mcp.errors import Forbidden, Hint, OpspawnError
from opspawn_mcp.exposed_uris import exposed_uri, original_uri
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.host.connection import Change
from opspawn_mcp.principals import Principal

logger = logging.getLogger("opspawn_mcp.exposed")

SEPARATOR = "__"
MAX_NAME = 64
_VALID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_HASH_CHARS = 12
MAX_SESSIONS = 1000
"""Connections remembered for list_changed notifications; the oldest is forgotten first."""
_T = TypeVar("_T")


def exposed_name(server: str, tool: str) -> str:
    """The name ``tool`` of ``server`` has on opspawn's MCP server; always valid, never shared.

    ``server__tool`` when that is valid and the server's name has no ``__`` (so the first ``__``
    splits it back); otherwise a shortened, cleaned form with a hash of both names, which starts
    with ``_``: a server name never does, so a hashed name cannot equal a plain one, and two
    hashed names differ unless SHA-256's first 48 bits collide.
    """
    plain = f"{server}{SEPARATOR}{tool}"
    if SEPARATOR not in server and _VALID.match(plain):
        return plain
    digest = hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()[:_HASH_CHARS]
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else "_" for ch in plain)
    return f"_{cleaned[: MAX_NAME - _HASH_CHARS - 2]}_{digest}"


class ExposedTools:
    """The exposed view of the pool: listing, routing calls, telling clients when the list changes."""

    def __init__(self, pool: OpsMcpClient, bus: SubscriptionBus, keep: Keep | None = None) -> None:
        configs = {name: pool.server_config(name) for name in pool.server_names}
        self._configs = {name: config for name, config in configs.items() if config.expose}
        self._pool = pool
        self._bus = bus
        self._trail = AuditTrail(keep, pool.redact)
        """Every call, read and get is logged and, with ``keep``, stored (``opspawn_mcp.audit``)."""
        self._sessions: dict[str | None, ServerSession] = {}
        """2025-11-25 connections that listed tools, by MCP session id (None: stdio), each with the
        last request's session, which reaches the connection's standalone stream; 2026-07-28
        clients listen on ``bus`` instead."""
        pool.on_change(self._changed)
        for name in self._configs:
            pool.keep_open(name)

    @property
    def servers(self) -> list[str]:
        return list(self._configs)

    def _catalogue(self, by: Principal) -> dict[str, tuple[str, types.Tool]]:
        """Exposed name -> (server, tool) for what ``by`` may use, from the pool's cache (no I/O).

        A server without an open session shows nothing: its process died or its connection
        dropped, and the pool is reconnecting it (``keep_open``); it is listed again once back."""
        return {
            exposed_name(server, tool.name): (server, tool)
            for server in self._servers_for(by)
            for tool in self._pool.cached_tools(server)
        }

    def _servers_for(self, by: Principal) -> list[str]:
        return [s for s in self._configs if by.may_use_server(s) and self._pool.is_ready(s)]

    def remember(self, session: ServerSession | None, session_id: str | None) -> None:
        """``session``'s connection listed something: tell it of later changes."""
        if session is not None:
            self._sessions.pop(session_id, None)
            self._sessions[session_id] = session
            while len(self._sessions) > MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]

    def list_tools(self, by: Principal) -> list[types.Tool]:
        """The exposed tools ``by`` may call."""
        return [
            tool.model_copy(
                update={"name": name, "description": f"[{server}] {tool.description or tool.name}"}
            )
            for name, (server, tool) in self._catalogue(by).items()
        ]

    def route(self, name: str, by: Principal) -> tuple[str, str] | None:
        """The (server, tool) an exposed name stands for, or None when it names no exposed tool."""
        found = self._catalogue(by).get(name)
        return None if found is None else (found[0], found[1].name)

    async def call(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        by: Principal,
        *,
        progress: ProgressFnT | None = None,
        meta: dict[str, Any] | None = None,
    ) -> types.CallToolResult:
        """Call through the pool; a failure is an ``isError`` result with the text an agent would read.
        ``meta`` is the downstream request's ``_meta`` (the caller's delegation chain)."""
        try:
            return await self._trail.run(
                ExposedRequest(by.name, server, "tool", tool, arguments),
                lambda: self._call(server, tool, arguments, by, progress, meta),
            )
        except ToolError as exc:
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=exc.message)], is_error=True
            )

    async def _call(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        by: Principal,
        progress: ProgressFnT | None,
        meta: dict[str, Any] | None,
    ) -> types.CallToolResult:
        if self._configs[server].needs_approval(tool):
            raise Forbidden(
                f"The tool {server}/{tool} needs a person's approval (mcpServers.{server}.require_approval), "
                "and a direct call has no task to wait in.",
                hint=Hint(
                    "Ask an agent to call it in a task with {}; the task waits for the approval.", "submit"
                ),
                server=server,
                tool=tool,
            )
        return await self._pool.call_tool(
            server, tool, arguments, meta=meta, progress_callback=progress, by=by.name
        )

    # -- resources and prompts -----------------------------------------------------------------

    def list_resources(self, by: Principal) -> list[types.Resource]:
        """The exposed servers' resources ``by`` may read, under their ``opspawn+server://`` URIs."""
        return [
            resource.model_copy(
                update={"uri": exposed_uri(server, resource.uri), "description": _tagged(server, resource)}
            )
            for server in self._servers_for(by)
            for resource in self._pool.cached_resources(server)
        ]

    def list_resource_templates(self, by: Principal) -> list[types.ResourceTemplate]:
        return [
            template.model_copy(
                update={
                    "uri_template": exposed_uri(server, template.uri_template),
                    "description": _tagged(server, template),
                }
            )
            for server in self._servers_for(by)
            for template in self._pool.cached_resource_templates(server)
        ]

    def route_uri(self, uri: str, by: Principal) -> tuple[str, str] | None:
        """The (server, downstream URI) an exposed URI stands for, if ``by`` may read it. Any URI of
        the server is passed on (a template's expansion is not listed), the server decides."""
        found = original_uri(uri)
        if found is None or found[0] not in self._configs or not by.may_use_server(found[0]):
            return None
        return found

    async def read_resource(self, server: str, uri: str, by: Principal) -> types.ReadResourceResult:
        """``resources/read`` through the pool; the contents carry the exposed URIs."""
        result = await self._mapped(
            ExposedRequest(by.name, server, "resource", uri), lambda: self._pool.read_resource(server, uri)
        )
        contents = [
            content.model_copy(update={"uri": exposed_uri(server, content.uri)})
            for content in result.contents
        ]
        return result.model_copy(update={"contents": contents})

    def list_prompts(self, by: Principal) -> list[types.Prompt]:
        return [
            prompt.model_copy(update={"name": name, "description": _tagged(server, prompt)})
            for name, (server, prompt) in self._prompts(by).items()
        ]

    def _prompts(self, by: Principal) -> dict[str, tuple[str, types.Prompt]]:
        return {
            exposed_name(server, prompt.name): (server, prompt)
            for server in self._servers_for(by)
            for prompt in self._pool.cached_prompts(server)
        }

    def route_prompt(self, name: str, by: Principal) -> tuple[str, str] | None:
        found = self._prompts(by).get(name)
        return None if found is None else (found[0], found[1].name)

    async def get_prompt(
        self, server: str, prompt: str, arguments: dict[str, str] | None, by: Principal
    ) -> types.GetPromptResult:
        return await self._mapped(
            ExposedRequest(by.name, server, "prompt", prompt, dict(arguments or {})),
            lambda: self._pool.get_prompt(server, prompt, arguments),
        )

    async def _mapped(self, exposed: ExposedRequest, request: Callable[[], Awaitable[_T]]) -> _T:
        """An audited read or prompt get; a failure becomes the MCP error the client gets."""
        server = exposed.server
        try:
            return await self._trail.run(exposed, request)
        except OpspawnError as exc:  # Unavailable: unreachable, dropped, or no answer in time
            raise MCPError(types.INTERNAL_ERROR, exc.message) from None
        except MCPError as exc:
            raise MCPError(exc.code, f"MCP server {server!r} answered: {exc.message}") from None

    # -- changes ---------------------------------------------------------------------------------

    async def _changed(self, server: str, change: Change) -> None:
        """A downstream list changed, or the server came or went: the clients are told
        (``*/list_changed``): every kind when it came or went, else the kind that changed."""
        if server not in self._configs:
            return
        kinds = _EVENTS if change == "state" else {change: _EVENTS[change]}
        for kind, event in kinds.items():
            await self._bus.publish(event)
            for session_id, session in list(self._sessions.items()):
                try:
                    await _SEND[kind](session)
                except Exception as exc:  # a closed connection: it will not list again
                    logger.debug("%s/list_changed not sent to MCP session %s: %r", kind, session_id, exc)
                    self._sessions.pop(session_id, None)


_EVENTS: dict[str, ServerEvent] = {
    "tools": ToolsListChanged(),
    "resources": ResourcesListChanged(),
    "prompts": PromptsListChanged(),
}
_SEND: dict[str, Callable[[ServerSession], Awaitable[None]]] = {
    "tools": ServerSession.send_tool_list_changed,
    "resources": ServerSession.send_resource_list_changed,
    "prompts": ServerSession.send_prompt_list_changed,
}


def _tagged(server: str, item: types.Resource | types.ResourceTemplate | types.Prompt) -> str:
    return f"[{server}] {item.description or item.name}"
