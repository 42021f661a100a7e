"""The server process's runtime: the one owner of everything ``opspawn-mcp serve`` runs.

``Runtime`` opens the store, the pool, the enqueuer, the ``TaskService`` and the MCP server, and
closes them in reverse; the binding rules live here (``check_bind``). See docs/mcp-server.md,
"Embedding the HTTP app".
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager, suppress
from types import TracebackType
from typing import Any

import uvicorn
from mcp.server import MCPServer
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from gateway.app import gateway_routes
from opspawn_mcp.broker import DramatiqEnqueuer, is_embedded
from opspawn_mcp.chaining import ProcessChain
from opspawn_mcp.config import LOCALHOSTS, Config
from opspawn_mcp.embedded import EmbeddedWorker
from opspawn_mcp.errors import Forbidden, Unavailable
from opspawn_mcp.grpc_internal import serve_grpc
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.http_guard import PROBE_PATHS, HttpGuard
from opspawn_mcp.mcp_http import MCP_PATH, SSE_MESSAGE_PATH, SSE_PATH, build_http_app
from opspawn_mcp.principals import Principals
from opspawn_mcp.scheduler import Enqueuer
from opspawn_mcp.server import build_server
from opspawn_mcp.service import TaskService
from opspawn_mcp.store import open_store
from opspawn_mcp.store.base import TaskStore
from opspawn_mcp.telemetry import tracing
from opspawn_mcp.telemetry.http import METRICS_PATH, TracedRequests, metrics_route
from opspawn_mcp.telemetry.logs import announce
from opspawn_mcp.ui import dashboard_routes

log = logging.getLogger("opspawn_mcp.runtime")

UNTRACED_PATHS = (MCP_PATH, SSE_PATH, SSE_MESSAGE_PATH, METRICS_PATH, *PROBE_PATHS)
"""No HTTP span: MCP messages get the MCP SDK's spans (``telemetry.http``); scrapes and probes
would only be noise."""


def check_bind(host: str, principals: Principals) -> None:
    """Refuse to expose the server beyond this machine unless every call must carry a token
    (``opspawn.server.tokens`` or ``auth_token_env``).

    Anyone who can reach the port could otherwise run agents with the configured LLM key and
    every configured downstream server.
    """
    if host not in LOCALHOSTS and not principals.auth_required:
        raise Forbidden(
            f"Refusing to serve on {host} without a token: anyone who can reach it could run agents. "
            "Name tokens in opspawn.server.tokens (each the name of an env variable holding a long "
            "random token; clients then send 'Authorization: Bearer <token>'), or bind 127.0.0.1."
        )


FIRST_CONNECT_WAIT_S = 15.0
"""How long ``serve --stdio`` waits for the first connect attempt of every downstream server
before it answers its client; a server that takes longer is shown ``connecting`` meanwhile."""


class Runtime:
    """Owns the store, the pool, the enqueuer/worker, the service and the MCP server.

    ``store`` may be passed in (tests share one); otherwise ``opspawn.store_url`` decides and
    the runtime owns it. Enter and exit in the same task: the pool's task group requires it.
    """

    def __init__(self, config: Config, *, store: TaskStore | None = None) -> None:
        self.config = config
        self._given_store = store
        self._stack: AsyncExitStack | None = None
        self._service: TaskService | None = None
        self._mcp: MCPServer | None = None
        self._embedded: EmbeddedWorker | None = None
        self._warming: asyncio.Task[None] | None = None

    @property
    def service(self) -> TaskService:
        if self._service is None:
            raise RuntimeError("Runtime is not started; use it as an async context manager")
        return self._service

    @property
    def mcp(self) -> MCPServer:
        if self._mcp is None:
            raise RuntimeError("Runtime is not started; use it as an async context manager")
        return self._mcp

    async def __aenter__(self) -> Runtime:
        async with AsyncExitStack() as stack:
            store = self._given_store
            if store is None:
                store = open_store(
                    self.config.opspawn.store_url,
                    settings=self.config.opspawn.store,
                    concurrency=self.config.opspawn.worker.concurrency,
                )
                await store.start()
                stack.push_async_callback(store.close)
            chain = ProcessChain(self.config)
            pool = await stack.enter_async_context(
                OpsMcpClient(
                    self.config.mcp_servers,
                    default_concurrency=self.config.opspawn.worker.concurrency,
                    stdio_env=chain.stdio_env,
                )
            )
            if chain.connect_at_start:
                # Every server connects in the background, so list_servers shows their tools (and
                # a broken one its error) without delaying startup.
                warming = self._warming = asyncio.create_task(pool.open_all(), name="opspawn-warm-pool")
                stack.push_async_callback(_cancel, warming)
            else:
                log.warning("this opspawn was %s", chain.refusal)
            enqueuer: Enqueuer
            if is_embedded(self.config):
                enqueuer = self._embedded = await stack.enter_async_context(
                    EmbeddedWorker(self.config, store, pool)
                )
            else:
                enqueuer = await stack.enter_async_context(DramatiqEnqueuer.for_config(self.config))
            self._service = TaskService(self.config, store, enqueuer, pool)
            self._mcp = build_server(self._service, Principals.from_config(self.config).local, pool=pool)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        self._service = None
        self._mcp = None
        self._embedded = None
        self._warming = None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    def begin_shutdown(self) -> None:
        """On SIGINT/SIGTERM, before the doors close: the embedded worker stops its agents now
        and says which tasks it hands back (the doors may take a while to drain)."""
        if self._embedded is not None:
            self._embedded.runner.begin_shutdown()

    # -- transports -------------------------------------------------------------------------

    async def serve_stdio(self) -> None:
        """Speak MCP on stdin/stdout until the client closes stdin or SIGINT/SIGTERM arrives.

        The SDK diverts fd 1 to stderr meanwhile, so a stray print cannot corrupt the protocol
        stream. ``opspawn_mcp.stdio`` screens each line first, so a malformed message gets a
        JSON-RPC error instead of silence, and its read can be cancelled. A signal cancels only
        this call, so the runtime still closes in order.
        """
        from opspawn_mcp.stdio import serve_stdio

        task = asyncio.current_task()
        assert task is not None
        stopped = False

        def stop() -> None:
            nonlocal stopped
            stopped = True
            self.begin_shutdown()
            task.cancel()

        with _on_signals(stop):
            try:
                await self._first_connects()
                await serve_stdio(self.mcp)
            except asyncio.CancelledError:
                if not stopped:
                    raise
                task.uncancel()

    async def _first_connects(self) -> None:
        """Wait (at most ``FIRST_CONNECT_WAIT_S``) until every configured server was tried once.

        An assistant looks at ``list_servers`` right after it connects over stdio, once; a server
        still ``connecting`` with no tools then reads as "nothing here". Over HTTP nobody is
        waiting on the first answer, so ``serve_http`` does not wait."""
        if self._warming is not None and not self._warming.done():
            await asyncio.wait({self._warming}, timeout=FIRST_CONNECT_WAIT_S)

    def http_app(
        self,
        host: str,
        port: int,
        *,
        principals: Principals | None = None,
        extra_routes: Sequence[BaseRoute] = (),
    ) -> Starlette:
        """The one HTTP app ``serve_http`` serves: MCP (/mcp, /sse), ``extra_routes``, /metrics, the
        REST gateway and the dashboard (/ui), all behind one ``HttpGuard`` for ``host:port`` (pass
        the real port, not 0).

        ``principals`` defaults to the config's; the guard and the OpenAPI document's security
        come from the same object, so the document says exactly what the guard demands.
        """
        principals = Principals.from_config(self.config) if principals is None else principals
        settings = self.config.opspawn.server
        guard = HttpGuard.for_server(
            principals,
            host,
            port,
            allowed_hosts=settings.allowed_hosts,
            allowed_origins=settings.allowed_origins,
        )
        rest = gateway_routes(self.service, auth_required=principals.auth_required)
        ui = dashboard_routes(self.service, principals)
        routes = [*extra_routes, metrics_route(self.service), *rest, *ui]
        app = build_http_app(self.mcp, guard, extra_routes=routes)
        if tracing.enabled():
            app.add_middleware(TracedRequests, untraced=UNTRACED_PATHS)
        return app

    async def serve_http(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        extra_routes: Sequence[BaseRoute] = (),
        on_ready: Callable[[str], Any] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """Serve MCP (streamable HTTP and SSE), the REST gateway on the same port, and gRPC on
        ``opspawn.server.grpc_port`` if set, until cancelled or signalled.

        The socket is bound before the app is built (or passed in, bound by ``bind_http``
        before the runtime opened anything), so port 0 (tests) yields a known port for the
        Host-header checks and for ``on_ready(base_url)``. The socket is closed on return.
        Both doors authenticate with one ``Principals``, read from the config once.
        """
        settings = self.config.opspawn.server
        host = settings.host if host is None else host
        port = settings.port if port is None else port
        principals = Principals.from_config(self.config)
        check_bind(host, principals)
        if sock is None:
            sock = bind_http(host, port)
        actual = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        base = f"http://{shown}:{actual}"
        app = self.http_app(host, actual, principals=principals, extra_routes=extra_routes)
        # log_config=None: uvicorn's lines go through the process's handler (text or JSON).
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, log_config=None)
        server = _Server(config)

        def stop() -> None:
            self.begin_shutdown()
            server.should_exit = True

        try:
            async with AsyncExitStack() as doors:
                if settings.grpc_port is not None:
                    grpc_door = await doors.enter_async_context(
                        serve_grpc(self.service, host, settings.grpc_port, principals)
                    )
                    announce(f"opspawn: serving gRPC at {grpc_door.target}")
                announce(
                    f"opspawn: serving MCP at {base}{MCP_PATH} (SSE at {base}{SSE_PATH}), REST at {base}/v1, "
                    f"the dashboard at {base}/ui"
                )
                if on_ready is not None:
                    on_ready(base)
                with _on_signals(stop):
                    await server.serve(sockets=[sock])
        finally:
            sock.close()


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: it re-raises the signal after shutting down, which
    would kill the process before the runtime closes (agents, child servers, the store).
    ``_on_signals`` asks it to exit instead, and the runtime then closes in order."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextmanager
def _on_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` on SIGINT/SIGTERM while inside the block (main thread only)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def bind_http(host: str, port: int) -> socket.socket:
    """A listening socket for ``serve_http``; ``Unavailable`` (one clear line) if the port is taken.

    Made with ``IPPROTO_TCP`` explicitly: asyncio sets ``TCP_NODELAY`` only on accepted sockets
    whose ``proto`` says TCP, and with proto 0 Nagle plus the client's delayed ACK stalled the
    second segment of every answer on a kept-alive connection by ~40 ms.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unavailable(
            f"Cannot listen on {host}:{port}: {exc.strerror}. Pick another port with `serve --port P` "
            "(or opspawn.server.port, $OPSPAWN_SERVER_PORT), or stop what is using this one."
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock
