"""One downstream server's long-lived session: opening it, sharing it, noticing when it breaks.

An owner task per session, single-flight opening, backoff, and a frozen server replaced.
See docs/host.md, "How a session lives", "States" and "Faults".
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

import anyio
import anyio.abc
import mcp.types as types
from mcp.client.session import ClientSession, IncomingMessage
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError

from agentkit.errors import ToolError
from agentkit.mcp_proxy import error_from_mcp
from opspawn_mcp.chaining import OPSPAWN_NAME, advertised_instance
from opspawn_mcp.config import ServerConfig, StdioServerConfig
from opspawn_mcp.errors import Forbidden, Hint, OpspawnError, Unavailable
from opspawn_mcp.host import subtasks
from opspawn_mcp.host.extras import EXTRA_KINDS, ExtraKind, Extras, all_pages
from opspawn_mcp.host.models import CallRecord, HiddenTool, ServerInfo, ServerState
from opspawn_mcp.host.tasks import TASKS_EXTENSION, TaskEnded, TaskOverdue, follow, task_claim
from opspawn_mcp.host.transports import Secrets, WatchedReadStream, open_transport, stderr_log
from opspawn_mcp.mcp_tasks import CreateTaskResult, DetailedTask

logger = logging.getLogger("opspawn_mcp.host")

CLIENT_INFO = types.Implementation(name="opspawn", version="0.1.0")
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
UNAVAILABLE_AFTER = 3
"""Consecutive failures before a server is reported ``unavailable`` and calls stop waiting for it."""
STDERR_DRAIN_S = 1.0
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "alert": logging.CRITICAL,
    "emergency": logging.CRITICAL,
}
MIN_CONNECT_TIMEOUT_S = 30.0
"""Starting a server (an interpreter, ``npx`` resolving a package) can take longer than a short
per-call ``timeout_s``; the handshake gets at least this long."""
MAX_CONNECT_TIMEOUT_S = 120.0
TEARDOWN_S = 5.0
"""How long leaving a session may talk to the server (streamable HTTP's DELETE): a frozen server
never answers, and must not hold the owner task, or the pool's shutdown, for the read timeout.
A stdio server's own shutdown (close stdin, SIGTERM, SIGKILL) is shielded and bounded by the SDK."""
SEND_GRACE_S = 1.0
"""The pool's own deadline for a call is ``timeout_s`` plus this; see ``call_tool``."""
DEFAULT_CONCURRENCY = 16
RECENT_CALLS = 20
"""Exposed calls each server keeps for ``list_servers``; the audit log has them all."""
Change = Literal["tools", "resources", "prompts", "state"]
"""What changed about a server: the tools it shows (a ``list_changed`` refresh), its resources or
prompts (``list_changed``, exposed servers only), or its availability (a session became ready, or a ready session was lost)."""
_Result = TypeVar("_Result")
ChangeListener = Callable[[str, Change], Coroutine[Any, Any, None]]
"""Called with the server's name and what changed; runs in the pool's task group."""


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Full-range jitter around an exponential step, so restarting workers do not reconnect in step."""
    step: float = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** max(0, failures - 1))
    jitter: float = (rng or random).random()
    return step * (0.5 + jitter)


def _is_connection_lost(exc: MCPError) -> bool:
    """The SDK reports a closed stream, and a streamable-HTTP session the server forgot, this way."""
    if exc.code == types.CONNECTION_CLOSED:
        return True
    return exc.code == types.INVALID_REQUEST and "session terminated" in exc.message.lower()


def _failure_line(exc: BaseException) -> str:
    """One line for a person: exception groups from transports are unwrapped to their first leaf."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, OpspawnError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out while connecting (initialize or tools/list did not answer)"
    if isinstance(exc, MCPError):
        return f"{exc.message} (MCP error {exc.code})"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class _Attempt:
    """One owner task's lifetime: ``ready`` fires when its session is usable or it has failed."""

    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    session: ClientSession | None = None
    error: str | None = None
    ended: bool = False


class ServerConnection:
    """The pool's state for one configured server; all methods run on the pool's event loop."""

    def __init__(
        self,
        name: str,
        config: ServerConfig,
        *,
        default_concurrency: int = DEFAULT_CONCURRENCY,
        listeners: list[ChangeListener] | None = None,
        stdio_env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._stdio_env = dict(stdio_env or {})
        """Entries of the pool's own in a stdio server's environment (``OPSPAWN_CHAIN``)."""
        self.opspawn_instance: str | None = None
        """The instance id the server advertises when it is an opspawn (``io.opspawn/chaining``)."""
        self.opspawn = False
        """Whether the server is an opspawn: it advertises ``io.opspawn/chaining`` (2026-07-28),
        or, on 2025-11-25 where the SDK sends no extensions, calls itself ``opspawn``."""
        self._listeners = [] if listeners is None else listeners
        self.config = config
        self.concurrency = config.max_concurrency or default_concurrency
        """Calls in flight at once: the server's ``max_concurrency``, else the pool's default."""
        self.secrets = Secrets()
        self._tg: anyio.abc.TaskGroup | None = None
        self._limit: anyio.Semaphore | None = None
        self._attempt: _Attempt | None = None
        self._closing = False
        self._failures = 0
        self._retry_at = 0.0
        self._tools: list[types.Tool] = []
        """Every tool the server listed last; ``tools`` is what the config's filter shows of them."""
        self._listed = False
        self._tools_stale = False
        self._refresh_lock: anyio.Lock | None = None
        self._timeouts = 0
        """Call timeouts in a row on the current session; an answer or a new session resets it."""
        self._unhealthy = False
        self.last_error: str | None = None
        self.calls = 0
        self.errors = 0
        self.recent_calls: deque[CallRecord] = deque(maxlen=RECENT_CALLS)
        self.extras = Extras()
        """Resources, templates and prompts, listed for exposed servers only (``host.extras``)."""
        self.keep_open = False
        """Reconnect in the background after a loss (with the usual backoff), not on the next call:
        set for exposed servers, whose tools must come back on opspawn's list by themselves."""
        self._reopening: set[anyio.CancelScope] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self._limit = anyio.Semaphore(self.concurrency)
        self._refresh_lock = anyio.Lock()
        self._closing = False

    def close(self) -> None:
        """Ask the owner task to leave its contexts; the pool's task group waits for it."""
        self._closing = True
        for scope in self._reopening:
            scope.cancel()
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.stop.set()

    @property
    def transport(self) -> Literal["stdio", "sse", "streamable-http"]:
        return "stdio" if isinstance(self.config, StdioServerConfig) else self.config.transport

    @property
    def state(self) -> ServerState:
        attempt = self._attempt
        if attempt is not None:
            return "ready" if attempt.session is not None else "connecting"
        if self._failures >= UNAVAILABLE_AFTER:
            return "unavailable"
        return "unhealthy" if self._unhealthy else "idle"

    def info(self) -> ServerInfo:
        names = [tool.name for tool in self.tools]
        curation = self.config.tools
        hidden = [
            HiddenTool(name=tool.name, reason=reason)
            for tool in self._tools
            if (reason := curation.hidden_reason(tool.name)) is not None
        ]
        return ServerInfo(
            name=self.name,
            transport=self.transport,
            state=self.state,
            tools=names,
            tool_count=len(names),
            hidden=hidden,
            unmatched=curation.unmatched(t.name for t in self._tools) if self._listed else [],
            last_error=self.last_error,
            calls=self.calls,
            errors=self.errors,
            opspawn_instance=self.opspawn_instance,
            recent_calls=list(self.recent_calls),
        )

    # -- getting a session -----------------------------------------------------------------------

    def _ensure_open(self) -> anyio.abc.TaskGroup:
        """The pool's task group; a pool not entered, or already left, refuses with advice."""
        if not self._closing and self._tg is not None:
            return self._tg
        raise Unavailable(
            f"The MCP host pool is closed, so server {self.name!r} cannot be reached. "
            "Use the client inside `async with OpsMcpClient(...)`.",
            server=self.name,
        )

    async def session(self) -> ClientSession:
        """The open session, opening it (once, shared by all waiters) if there is none."""
        while True:
            tg = self._ensure_open()
            attempt = self._attempt
            if attempt is None:
                wait = self._retry_at - anyio.current_time()
                if wait > 0:
                    if self._failures >= UNAVAILABLE_AFTER:
                        raise Unavailable(
                            f"MCP server {self.name!r} is unavailable after {self._failures} failed attempts "
                            f"(last error: {self.last_error}). It will be retried in {wait:.1f}s; "
                            "check the server's command or URL and its log lines.",
                            server=self.name,
                            last_error=self.last_error,
                        )
                    await anyio.sleep(wait)
                    continue
                attempt = self._attempt = _Attempt()
                tg.start_soon(self._own, attempt, name=f"mcp-server:{self.name}")
            await attempt.ready.wait()
            if attempt.session is not None and not attempt.ended:
                return attempt.session
            if attempt.error is not None:
                raise Unavailable(
                    f"Could not connect to MCP server {self.name!r}: {attempt.error}. "
                    "The next call retries with backoff; check the server's config and its log lines.",
                    server=self.name,
                    last_error=attempt.error,
                )

    def _connect_timeout(self) -> float:
        return min(max(self.config.timeout_s, MIN_CONNECT_TIMEOUT_S), MAX_CONNECT_TIMEOUT_S)

    async def _own(self, attempt: _Attempt) -> None:
        """Owner task: open, serve until stopped or broken, close; never lets an error escape."""
        try:
            async with anyio.create_task_group() as tg:
                try:
                    await self._serve(attempt, tg)
                except Exception as exc:
                    self._failed(attempt, _failure_line(exc))
                # The transport is closed and the process reaped; give the stderr reader a moment
                # to log the last lines (a crash's traceback) before it is cancelled. A grandchild
                # still holding the pipe cannot stall shutdown past this deadline.
                tg.cancel_scope.deadline = anyio.current_time() + STDERR_DRAIN_S
        except Exception as exc:
            self._failed(attempt, _failure_line(exc))
        finally:
            attempt.ended = True
            attempt.session = None
            if self._attempt is attempt:
                # Stopped from outside without a recorded failure: still a lost session.
                self._failed(attempt, attempt.error or "the session ended")
            attempt.ready.set()

    async def _serve(self, attempt: _Attempt, tg: anyio.abc.TaskGroup) -> None:
        with anyio.CancelScope() as teardown:
            transport = open_transport(self.name, self.config, self.secrets, tg, self._stdio_env)
            async with transport as (read, write):
                watched = WatchedReadStream(read, lambda: self._lost(attempt, "the server closed the stream"))
                async with ClientSession(
                    watched,
                    write,
                    message_handler=lambda message: self._on_message(attempt, tg, message),
                    logging_callback=self._on_log,
                    client_info=CLIENT_INFO,
                    extensions={TASKS_EXTENSION: {}},
                    result_claims={
                        TASKS_EXTENSION: [task_claim(self.config.timeout_s, self.config.task_timeout_s)]
                    },
                ) as session:
                    with anyio.fail_after(self._connect_timeout()):
                        await self._handshake(session)
                        self._tools_stale = False
                        tools = await self._list_all(session)
                        if self.config.expose:
                            for kind in EXTRA_KINDS:
                                await self.extras.load(self.name, session, kind)
                    self._ready(attempt, session, tools)
                    await attempt.stop.wait()
                    teardown.deadline = anyio.current_time() + TEARDOWN_S

    async def _handshake(self, session: ClientSession) -> None:
        """``initialize`` (2025-11-25), or with ``protocol: "auto"`` a ``server/discover`` first,
        falling back to ``initialize`` when the server does not speak 2026-07-28 (the SDK's
        ``Client(mode="auto")`` policy). Only the 2026-07-28 wire carries the tasks extension."""
        if self.config.protocol == "auto":
            try:
                await session.discover()
                return
            except MCPError as exc:
                logger.info("MCP server %r does not speak 2026-07-28 (%s); using initialize", self.name, exc)
            try:
                await session.initialize()
            except MCPError as exc:
                if exc.code != types.UNSUPPORTED_PROTOCOL_VERSION:
                    raise
                # A modern server slower to start than the probe's timeout (an opspawn importing
                # its stack on a busy machine) answered it late and now refuses initialize.
                logger.info("MCP server %r answered server/discover late; probing again", self.name)
                await session.discover()
            return
        await session.initialize()

    async def _on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        """``notifications/message`` from the server goes to the same log as its stderr."""
        level = _LOG_LEVELS.get(params.level, logging.INFO)
        text = params.data if isinstance(params.data, str) else repr(params.data)
        stderr_log.log(
            level, "[%s] %s", self.name, self.secrets.redact(text), extra={"mcp_server": self.name}
        )

    def _ready(self, attempt: _Attempt, session: ClientSession, tools: list[types.Tool]) -> None:
        if attempt.stop.is_set():
            return
        attempt.session = session
        capabilities = session.server_capabilities
        self.opspawn_instance = advertised_instance(capabilities.extensions if capabilities else None)
        info = session.server_info
        self.opspawn = self.opspawn_instance is not None or (info is not None and info.name == OPSPAWN_NAME)
        self._set_tools(tools, announce=False)
        self._notify("state")
        self._timeouts = 0
        self._unhealthy = False
        # The failure count is reset by a call that gets an answer, not by the handshake: a server
        # that starts fine and dies on every call must still back off and end up unavailable.
        logger.info("MCP server %r ready with %d tools", self.name, len(tools))
        attempt.ready.set()

    def _failed(self, attempt: _Attempt, error: str) -> None:
        """Record a failure once per attempt and schedule the next one (in the background too
        when ``keep_open``); listeners hear of a ready session lost."""
        attempt.stop.set()
        if self._attempt is not attempt:
            return
        self._attempt = None
        if self._closing:
            return
        if attempt.session is not None:
            self._notify("state")
        error = self.secrets.redact(error)
        attempt.error = error
        self.last_error = error
        self._failures += 1
        delay = backoff_delay(self._failures)
        self._retry_at = anyio.current_time() + delay
        logger.warning(
            "MCP server %r failed (%d in a row): %s; next attempt in %.2fs",
            self.name,
            self._failures,
            error,
            delay,
        )
        if self.keep_open and self._tg is not None:
            self._tg.start_soon(self._reopen_later, name=f"mcp-server-reopen:{self.name}")
        attempt.ready.set()

    async def _reopen_later(self) -> None:
        """Once the backoff delay has passed, open a new session unless a call already did; a
        failure schedules the next try through ``_failed``, so one chain runs at a time."""
        with anyio.CancelScope() as scope:
            self._reopening.add(scope)
            try:
                await anyio.sleep(max(0.0, self._retry_at - anyio.current_time()))
                if self._attempt is None and not self._closing:
                    await self.session()
            except Unavailable as exc:
                logger.debug("reopening MCP server %r failed: %s", self.name, exc.message)
            finally:
                self._reopening.discard(scope)

    def _notify(self, change: Change) -> None:
        if self._tg is not None:
            for listener in self._listeners:
                self._tg.start_soon(listener, self.name, change)

    def _lost(self, attempt: _Attempt, why: str) -> None:
        if self._closing:
            return
        detail = (
            f"{why} (the process exited; its stderr is in the log under [{self.name}])"
            if self.transport == "stdio"
            else f"{why} (the HTTP connection dropped)"
        )
        self._failed(attempt, detail)

    async def _on_message(self, attempt: _Attempt, tg: anyio.abc.TaskGroup, message: IncomingMessage) -> None:
        """Runs on the session's receive path: only schedule work here, never wait on the session."""
        if isinstance(message, types.ToolListChangedNotification):
            self._tools_stale = True
            session = attempt.session
            if session is not None:
                tg.start_soon(self._refresh_quietly, session)
        elif isinstance(message, types.ResourceListChangedNotification | types.PromptListChangedNotification):
            kind: ExtraKind = (
                "resources" if isinstance(message, types.ResourceListChangedNotification) else "prompts"
            )
            session = attempt.session
            if session is not None and self.config.expose:
                tg.start_soon(self._reload_extras, session, kind)
        elif isinstance(message, Exception):
            logger.warning(
                "MCP server %r transport error: %s", self.name, self.secrets.redact(_failure_line(message))
            )

    # -- catalogue -------------------------------------------------------------------------------

    @property
    def tools(self) -> list[types.Tool]:
        """The cached tools the config's ``tools`` filter shows: the one place curation is applied,
        so agents and MCP clients of opspawn see the same set."""
        curation = self.config.tools
        return [tool for tool in self._tools if curation.hidden_reason(tool.name) is None]

    def check_visible(self, tool: str) -> None:
        """Raise ``Forbidden`` naming the filter entry when the config hides ``tool``; no I/O."""
        reason = self.config.tools.hidden_reason(tool)
        if reason is not None:
            raise Forbidden(
                f"The tool {self.name}/{tool} is hidden by mcpServers.{self.name}.tools ({reason}), so it "
                "cannot be called; to use it, change that filter in the config.",
                hint=Hint("The tools that can be called are listed by {}.", "list_servers"),
                server=self.name,
                tool=tool,
                reason=reason,
            )

    def _set_tools(self, tools: list[types.Tool], *, announce: bool = True) -> None:
        before = [tool.name for tool in self.tools]
        self._tools = tools
        self._listed = True
        if announce and before != [tool.name for tool in self.tools]:
            self._notify("tools")
        unmatched = self.config.tools.unmatched(tool.name for tool in tools)
        if unmatched:
            logger.warning(
                "MCP server %r: mcpServers.%s.tools entries %s match none of its %d tools",
                self.name,
                self.name,
                ", ".join(map(repr, unmatched)),
                len(tools),
            )

    @staticmethod
    async def _list_all(session: ClientSession) -> list[types.Tool]:
        return await all_pages(session.list_tools, lambda page: page.tools)

    async def _reload_extras(self, session: ClientSession, kind: ExtraKind) -> None:
        try:
            with anyio.fail_after(self._connect_timeout()):
                await self.extras.load(self.name, session, kind)
        except Exception as exc:
            logger.warning("MCP server %r: refreshing %s failed: %s", self.name, kind, _failure_line(exc))
            return
        logger.info("MCP server %r %s changed", self.name, kind)
        self._notify(kind)

    async def _refresh(self, session: ClientSession) -> None:
        assert self._refresh_lock is not None
        async with self._refresh_lock:
            if not self._tools_stale:
                return
            self._tools_stale = False
            try:
                with anyio.fail_after(self._connect_timeout()):
                    tools = await self._list_all(session)
            except BaseException:
                self._tools_stale = True
                raise
            self._set_tools(tools)
            logger.info("MCP server %r tool list changed: %d tools", self.name, len(tools))

    async def _refresh_quietly(self, session: ClientSession) -> None:
        try:
            await self._refresh(session)
        except Exception as exc:
            logger.warning("MCP server %r: refreshing tools failed: %s", self.name, _failure_line(exc))

    def cached_tool(self, name: str) -> types.Tool | None:
        """The tool from the last tools/list, if listed and not hidden; no I/O (a cold pool knows no tools)."""
        return next((tool for tool in self.tools if tool.name == name), None)

    async def list_tools(self) -> list[types.Tool]:
        session = await self.session()
        if self._tools_stale:
            try:
                await self._refresh(session)
            except MCPError as exc:
                if _is_connection_lost(exc):
                    raise self._call_failed(exc, "tools/list", session) from None
                raise Unavailable(
                    f"MCP server {self.name!r} refused tools/list: {self.secrets.redact(_failure_line(exc))}.",
                    server=self.name,
                ) from None
            except TimeoutError:
                raise Unavailable(
                    f"MCP server {self.name!r} did not answer tools/list within {self._connect_timeout():g}s.",
                    server=self.name,
                ) from None
        self._failures = 0
        return self.tools

    # -- calls -----------------------------------------------------------------------------------

    def _call_failed(self, exc: MCPError, what: str, session: ClientSession) -> Unavailable:
        attempt = self._attempt
        detail = self.secrets.redact(_failure_line(exc))
        if attempt is not None and attempt.session is session:
            self._failed(attempt, f"connection lost during {what}: {detail}")
        return Unavailable(
            f"MCP server {self.name!r} dropped the connection during {what} ({detail}). "
            "The call may or may not have run; the next call reconnects.",
            server=self.name,
            last_error=self.last_error,
        )

    def _timed_out(self, tool: str, session: ClientSession) -> Unavailable:
        """Count a call timeout; the ``max_timeouts``-th in a row on this session closes it.

        A frozen process keeps its pipes and sockets open, so no stream ever ends: without this
        the pool would report it ``ready`` forever and every call would wait out its timeout.
        Timeouts from a session already replaced do not count against the new one.
        """
        timeout = f"{self.config.timeout_s:g}s"
        limit = self.config.max_timeouts
        attempt = self._attempt
        current = attempt is not None and attempt.session is session
        if current:
            self._timeouts += 1
        text = (
            f"MCP server {self.name!r} did not answer {tool!r} within {timeout}; the call was cancelled "
            "(the pool sends the server notifications/cancelled)."
        )
        replaced = (
            "its process is killed and the next call starts a new one"
            if self.transport == "stdio"
            else "its session is dropped and the next call reconnects"
        )
        if attempt is not None and current and self._timeouts >= limit:
            count = self._timeouts
            self._unhealthy = True
            self._failed(
                attempt,
                f"unhealthy: {count} calls in a row did not answer within {timeout} (the last: {tool!r}); "
                f"{replaced}",
            )
            text += f" That is {count} timeouts in a row, so the server is marked unhealthy: {replaced}."
        elif current:
            text += (
                f" After {limit} timeouts in a row the server is marked unhealthy and replaced. Try smaller "
                "input, or raise the server's timeout_s in the config."
            )
        else:
            text += " The session was replaced meanwhile; the next call uses the new one."
        return Unavailable(
            text,
            server=self.name,
            tool=tool,
            timeout_s=self.config.timeout_s,
            timeouts_in_a_row=self._timeouts if current else 0,
            unhealthy=self._unhealthy,
            last_error=self.last_error,
        )

    async def call_tool(
        self,
        tool: str,
        arguments: dict[str, Any],
        progress_callback: ProgressFnT | None,
        meta: dict[str, Any] | None = None,
        by: str | None = None,
    ) -> types.CallToolResult:
        """A successful result, or ``ToolError``: the one value a failed call becomes, whatever
        failed (the tool's ``isError``, a JSON-RPC error, a timeout, a lost or missing session).
        Its message is what the model reads; a pool failure is its ``__cause__`` (``Unavailable``, or
        ``Forbidden`` for a tool the config's filter hides, refused before any I/O)."""
        try:
            self.check_visible(tool)
        except Forbidden as exc:
            raise ToolError(exc.message) from exc
        self.calls += 1
        try:
            try:
                result = await self._call(tool, arguments, progress_callback, meta)
            except OpspawnError as exc:
                raise ToolError(exc.message) from exc
            if result.is_error:
                raise error_from_mcp(result, server=self.name, tool=tool)
        except ToolError as exc:
            self.errors += 1
            self._record(by, tool, exc.message)
            raise
        self._record(by, tool, None)
        return result

    async def request(self, what: str, send: Callable[[ClientSession], Awaitable[_Result]]) -> _Result:
        """Another request than a tool call (``resources/read``, ``prompts/get``) through the shared
        session, with a call's slot, deadline and loss handling. Raises ``Unavailable`` (the server
        cannot be reached, dropped the connection, did not answer within ``timeout_s``) or the
        server's ``MCPError``, its message with secrets redacted."""
        session: ClientSession | None = None
        try:
            async with self._borrow() as session:
                with anyio.move_on_after(self.config.timeout_s) as deadline:
                    answer = await send(session)
                if deadline.cancelled_caught:
                    raise self._timed_out(what, session)
        except MCPError as exc:
            if _is_connection_lost(exc) and session is not None:
                raise self._call_failed(exc, what, session) from None
            self._answered()
            raise MCPError(exc.code, self.secrets.redact(exc.message)) from None
        self._answered()
        return answer

    @asynccontextmanager
    async def _borrow(self) -> AsyncIterator[ClientSession]:
        """A call slot, then the session: in that order, so a request that waited for a slot while
        its server was replaced uses the new session, not the closed one it would have held."""
        self._ensure_open()
        assert self._limit is not None
        async with self._limit:
            yield await self.session()

    def _record(self, by: str | None, tool: str, error: str | None) -> None:
        """Keep an exposed call (one made ``by`` a principal, not by an agent) for ``list_servers``."""
        if by is not None:
            self.recent_calls.append(CallRecord(at=datetime.now(UTC), by=by, tool=tool, error=error))

    async def _call(
        self,
        tool: str,
        arguments: dict[str, Any],
        progress_callback: ProgressFnT | None,
        meta: dict[str, Any] | None,
    ) -> types.CallToolResult:
        session: ClientSession | None = None
        try:
            async with self._borrow() as session:
                delegation = subtasks.follows(tool, self.opspawn)
                if delegation:
                    arguments = subtasks.submit_arguments(arguments)
                # The SDK's read timeout starts once the request is written; a frozen server can
                # block the write itself (SSE posts one message at a time, a full stdin pipe), so
                # the whole call also has a deadline, a little later than the SDK's.
                with anyio.move_on_after(self.config.timeout_s + SEND_GRACE_S) as backstop:
                    answer = await session.call_tool(
                        tool,
                        arguments,
                        read_timeout_seconds=self.config.timeout_s,
                        progress_callback=progress_callback,
                        meta=None if meta is None else cast(types.RequestParamsMeta, dict(meta)),
                        allow_claimed=True,
                    )
                if backstop.cancelled_caught:
                    raise self._timed_out(tool, session)
                if isinstance(answer, CreateTaskResult):
                    # The per-call timeout now bounds each tasks/get; task_timeout_s the whole task.
                    answer = await follow(
                        session,
                        answer,
                        poll_timeout_s=self.config.timeout_s,
                        task_timeout_s=self.config.task_timeout_s,
                        progress=progress_callback,
                        server=self.name,
                    )
                elif delegation and isinstance(answer, types.CallToolResult):
                    # An opspawn without MCP Tasks on this wire: follow its task with its own tools.
                    answer = await subtasks.follow_submitted(
                        session,
                        answer,
                        server=self.name,
                        poll_timeout_s=self.config.timeout_s,
                        task_timeout_s=self.config.task_timeout_s,
                        progress=progress_callback,
                    )
                if not isinstance(answer, types.CallToolResult):
                    raise TypeError(f"expected a tool result, got {type(answer).__name__}")
                result = answer
        except TimeoutError:  # a tasks/get past timeout_s
            assert session is not None
            raise self._timed_out(tool, session) from None
        except TaskEnded as ended:
            self._answered()
            raise self._task_ended(tool, ended.task) from None
        except subtasks.SubtaskEnded as ended:
            self._answered()
            raise ToolError(self.secrets.redact(str(ended))) from None
        except TaskOverdue as overdue:
            self._answered()
            raise ToolError(
                f"MCP server {self.name!r} ran {tool!r} as task {overdue}, which did not finish within "
                f"task_timeout_s={self.config.task_timeout_s:g}s; it was cancelled (tasks/cancel). Raise "
                f"mcpServers.{self.name}.task_timeout_s in the config for longer work."
            ) from None
        except MCPError as exc:
            if exc.code == types.REQUEST_TIMEOUT and session is not None:
                raise self._timed_out(tool, session) from None
            if _is_connection_lost(exc) and session is not None:
                raise self._call_failed(exc, f"the call to {tool!r}", session) from None
            self._answered()
            raise ToolError(
                f"MCP server {self.name!r} rejected the call to {tool!r}: {self.secrets.redact(exc.message)} "
                f"(MCP error {exc.code})."
            ) from None
        except (OpspawnError, anyio.get_cancelled_exc_class(), KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            # A malformed result (schema mismatch, unexpected result kind) is the server's fault and
            # something the agent can report; it must not take the worker down.
            raise ToolError(
                f"MCP server {self.name!r} returned an unusable result for {tool!r}: "
                f"{self.secrets.redact(_failure_line(exc))}."
            ) from None
        self._answered()
        return result

    def _task_ended(self, tool: str, task: DetailedTask) -> ToolError:
        """A downstream task that ended without a result, as the one error value the model reads."""
        ran = f"MCP server {self.name!r} ran {tool!r} as task {task.task_id}, which"
        said = f": {self.secrets.redact(task.status_message)}" if task.status_message else ""
        if task.status == "failed":
            error = task.error or {}
            message = self.secrets.redact(str(error.get("message", "no reason given")))
            return ToolError(f"{ran} failed: {message} (MCP error {error.get('code', '?')}).")
        if task.status == "input_required":
            return ToolError(
                f"{ran} asked for input opspawn cannot give a downstream task, so it was cancelled{said}."
            )
        return ToolError(f"{ran} was cancelled on the server{said}.")

    def _answered(self) -> None:
        """The server answered a call: it is neither failing nor frozen."""
        self._failures = 0
        self._timeouts = 0
