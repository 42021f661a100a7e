"""OpsMcpClient: the process-wide pool of MCP sessions every agent's proxy calls go through.

It also refuses, before any I/O, a server outside the config or the task's allowed set.
See docs/host.md.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import anyio
import anyio.abc
import mcp.types as types
from mcp.shared.dispatcher import ProgressFnT

from agentkit.errors import ToolError
from agentkit.mcp_proxy import idempotent_from_annotations
from opspawn_mcp.config import ServerConfig
from opspawn_mcp.errors import Forbidden, NotFound, OpspawnError, Unavailable
from opspawn_mcp.host import subtasks
from opspawn_mcp.host.connection import DEFAULT_CONCURRENCY, ChangeListener, ServerConnection
from opspawn_mcp.host.models import ServerInfo
from opspawn_mcp.telemetry.hooks import downstream_call

logger = logging.getLogger("opspawn_mcp.host")


class OpsMcpClient:
    """One long-lived session per configured server, opened on first use and shared by all callers.

    Use it as ``async with OpsMcpClient(config.mcp_servers) as pool:``; leaving the block closes
    every session and stops every server process it started. ``eager=True`` runs ``open_all`` on
    entry so ``servers_info`` is complete at once.

    ``default_concurrency`` is the calls in flight per server for servers whose config leaves
    ``max_concurrency`` unset: a worker passes its ``worker.concurrency``, so a 1,000-slot worker
    is not capped at 16 calls per server by a default nobody chose. ``stdio_env`` is added to the
    environment of every stdio server it starts (a process passes ``OPSPAWN_CHAIN``, so an
    opspawn it starts knows who started it: ``opspawn_mcp.chaining``).
    """

    def __init__(
        self,
        servers: Mapping[str, ServerConfig],
        *,
        eager: bool = False,
        default_concurrency: int = DEFAULT_CONCURRENCY,
        stdio_env: Mapping[str, str] | None = None,
    ) -> None:
        if default_concurrency < 1:
            raise ValueError(f"default_concurrency must be at least 1, not {default_concurrency}")
        self._listeners: list[ChangeListener] = []
        self._servers = {
            name: ServerConnection(
                name,
                config,
                default_concurrency=default_concurrency,
                listeners=self._listeners,
                stdio_env=stdio_env,
            )
            for name, config in servers.items()
        }
        self._eager = eager
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("this OpsMcpClient is already open; create one per process and share it")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        for server in self._servers.values():
            server.start(tg)
        if self._eager:
            try:
                await self.open_all()
            except BaseException as exc:
                # Cancelled while connecting: close what was opened, or the task group leaks.
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        return self

    async def open_all(self) -> None:
        """Connect every configured server at once; a failure is recorded (state, ``last_error``,
        a warning in the log), never raised.

        Sessions open lazily otherwise, so a worker's first task would wait for every server it
        uses to start; a process calls this at start instead (in the background, if startup must
        not wait). Servers already connected are left as they are.
        """
        async with anyio.create_task_group() as connect:
            for server in self._servers.values():
                connect.start_soon(self._open_quietly, server)

    @staticmethod
    async def _open_quietly(server: ServerConnection) -> None:
        try:
            await server.session()
        except Unavailable as exc:
            logger.warning("connecting MCP server %r at start failed: %s", server.name, exc.message)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None, "__aexit__ without __aenter__"
        for server in self._servers.values():
            server.close()
        # Owners leave their transports themselves; stdio shutdown is bounded (stdin close, then
        # SIGTERM, then SIGKILL), so this join cannot hang on a server that ignores stdin.
        return await tg.__aexit__(exc_type, exc_val, exc_tb)

    # -- access ---------------------------------------------------------------------------------

    @property
    def server_names(self) -> list[str]:
        return list(self._servers)

    def _get(self, server: str) -> ServerConnection:
        try:
            return self._servers[server]
        except KeyError:
            known = ", ".join(sorted(self._servers)) or "none"
            raise NotFound(
                f"No MCP server named {server!r} is configured. Configured servers: {known}.",
                server=server,
            ) from None

    def check_server(self, server: str) -> None:
        """Raise ``NotFound`` (naming the configured servers) unless ``server`` is configured; no I/O.

        Views such as ``ScopedCaller`` refuse a bad name before doing anything else with it.
        """
        self._get(server)

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener(server, change)`` (in the pool's task group) whenever a server comes
        (a session is ready: ``"state"``) or goes (a ready session is lost: ``"state"``), and
        when the tools it shows change on a ``list_changed`` refresh (``"tools"``)."""
        self._listeners.append(listener)

    def keep_open(self, server: str) -> None:
        """Reconnect ``server`` in the background whenever its session is lost (after the usual
        backoff), instead of on its next call."""
        self._get(server).keep_open = True

    def is_ready(self, server: str) -> bool:
        """Whether ``server`` has an open session now; no I/O."""
        return self._get(server).state == "ready"

    def server_config(self, server: str) -> ServerConfig:
        return self._get(server).config

    def cached_tools(self, server: str) -> list[types.Tool]:
        """The tools ``server`` shows (after curation), from the cache; no I/O."""
        return self._get(server).tools

    def redact(self, server: str, text: str) -> str:
        """``text`` with the values of ``server``'s ``${VAR}`` references replaced by ``***``."""
        return self._get(server).secrets.redact(text)

    def cached_resources(self, server: str) -> list[types.Resource]:
        """The resources an exposed ``server`` listed last (none for other servers); no I/O."""
        return self._get(server).extras.resources

    def cached_resource_templates(self, server: str) -> list[types.ResourceTemplate]:
        return self._get(server).extras.templates

    def cached_prompts(self, server: str) -> list[types.Prompt]:
        return self._get(server).extras.prompts

    async def read_resource(self, server: str, uri: str) -> types.ReadResourceResult:
        """``resources/read`` on ``server`` through the shared session (``ServerConnection.request``)."""
        return await self._get(server).request(
            f"resources/read of {uri}", lambda session: session.read_resource(uri)
        )

    async def get_prompt(
        self, server: str, name: str, arguments: dict[str, str] | None
    ) -> types.GetPromptResult:
        """``prompts/get`` on ``server`` through the shared session (``ServerConnection.request``)."""
        return await self._get(server).request(
            f"prompts/get of {name}", lambda session: session.get_prompt(name, arguments)
        )

    def scoped(
        self, allowed: Collection[str] | None, *, meta: Mapping[str, Any] | None = None
    ) -> ScopedCaller:
        """A view for one task: only ``allowed`` servers (all configured ones when None); ``meta``
        goes into every call's ``_meta`` (the task's delegation chain, ``opspawn_mcp.chaining``)."""
        return ScopedCaller(self, None if allowed is None else frozenset(allowed), meta)

    # -- McpCaller ------------------------------------------------------------------------------

    async def list_tools(self, server: str) -> list[types.Tool]:
        """The server's tools, from the cache kept fresh by list_changed and reconnects."""
        return await self._get(server).list_tools()

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        meta: dict[str, Any] | None = None,
        progress_callback: ProgressFnT | None = None,
        by: str | None = None,
    ) -> types.CallToolResult:
        """Call ``tool`` on ``server`` through the shared session; a successful result or ``ToolError``.

        ``meta`` becomes the request's ``_meta``; ``by`` names the principal of a call made through
        opspawn's exposed tools (kept in the server's ``recent_calls``). A task answer is followed
        to its end. See docs/host.md, "Errors", "Downstream tasks" and "Idempotency keys and re-runs".
        """
        try:
            connection = self._get(server)
        except NotFound as exc:
            raise ToolError(exc.message) from exc
        return await downstream_call(
            server, tool, lambda: connection.call_tool(tool, arguments, progress_callback, meta, by)
        )

    # -- rerun policy ---------------------------------------------------------------------------

    def idempotent(self, server: str, tool: str) -> bool | None:
        """What the tool's annotations (from the cached tools/list) say about running it twice.

        agentkit's ``idempotent_from_annotations`` rule (None for a tool not in the cache), except
        that an opspawn downstream's ``submit_task`` is always True: a repeat with the call's key
        re-attaches to the task it started. See docs/host.md, "Idempotency keys and re-runs".
        """
        connection = self._get(server)
        if subtasks.follows(tool, connection.opspawn):
            return True
        found = connection.cached_tool(tool)
        return idempotent_from_annotations(found.annotations if found is not None else None)

    def may_rerun(self, server: str, tool: str) -> bool:
        """Whether a call of ``tool`` that was in flight when its worker died may be run again.

        The server's ``retry`` setting decides: ``always``, ``never``, or ``if_idempotent`` (the
        default), which re-runs only a tool ``idempotent`` calls True. Unknown means no: a call
        with side effects is never repeated silently; the agent is told its effect is unknown.
        """
        policy = self._get(server).config.retry
        if policy == "always":
            return True
        if policy == "never":
            return False
        return self.idempotent(server, tool) is True

    def servers_info(self) -> list[ServerInfo]:
        """What ``list_servers`` shows; reads cached state only, never does I/O."""
        return [server.info() for server in self._servers.values()]


class CallOptions(TypedDict, total=False):
    """The keywords of agentkit's ``McpCaller.call_tool``, as a view passes them on."""

    meta: dict[str, Any] | None
    progress_callback: ProgressFnT | None


class ScopedCaller:
    """``OpsMcpClient`` limited to one task's allowed servers; refuses others before any I/O."""

    def __init__(
        self,
        client: OpsMcpClient,
        allowed: frozenset[str] | None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._allowed = allowed
        self._meta = dict(meta or {})

    @property
    def allowed(self) -> frozenset[str] | None:
        return self._allowed

    def _check(self, server: str) -> None:
        if self._allowed is not None and server not in self._allowed:
            names = ", ".join(sorted(self._allowed)) or "none"
            raise Forbidden(
                f"This task may not use the MCP server {server!r}. Servers it may use: {names}.",
                server=server,
            )
        self._client.check_server(server)

    async def list_tools(self, server: str) -> list[types.Tool]:
        self._check(server)
        return await self._client.list_tools(server)

    async def call_tool(
        self, server: str, tool: str, arguments: dict[str, Any], **options: Unpack[CallOptions]
    ) -> types.CallToolResult:
        """``OpsMcpClient.call_tool`` for an allowed server, with this task's ``meta`` added."""
        try:
            self._check(server)
        except OpspawnError as exc:  # Forbidden or NotFound: the model reads why, once
            raise ToolError(exc.message) from exc
        if self._meta:
            options["meta"] = {**(options.get("meta") or {}), **self._meta}
        return await self._client.call_tool(server, tool, arguments, **options)

    def idempotent(self, server: str, tool: str) -> bool | None:
        """``OpsMcpClient.idempotent``, refused (``Forbidden``) for a server outside this task."""
        self._check(server)
        return self._client.idempotent(server, tool)

    def may_rerun(self, server: str, tool: str) -> bool:
        """``OpsMcpClient.may_rerun``, refused (``Forbidden``) for a server outside this task."""
        self._check(server)
        return self._client.may_rerun(server, tool)

    def servers_info(self) -> list[ServerInfo]:
        return [
            info
            for info in self._client.servers_info()
            if self._allowed is None or info.name in self._allowed
        ]
