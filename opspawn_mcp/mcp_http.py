"""opspawn's MCP server over HTTP: the streamable HTTP and SSE routes, and the one Starlette app
that serves them beside the REST gateway behind the HTTP guard (``opspawn_mcp.http_guard``).

The tools themselves are ``opspawn_mcp.server``; docs/mcp-server.md says how the doors share one app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from gateway.problems import EXCEPTION_HANDLERS
from opspawn_mcp.http_guard import HttpGuard

MCP_PATH = "/mcp"
SSE_PATH = "/sse"
SSE_MESSAGE_PATH = "/messages/"
MCP_SESSION_HEADER = "mcp-session-id"


def mcp_http_routes(
    server: MCPServer,
) -> tuple[list[BaseRoute], Callable[[], AbstractAsyncContextManager[None]]]:
    """Routes for streamable HTTP (/mcp) and SSE (/sse, /messages/), and the lifespan the
    streamable HTTP session manager needs.

    The SDK's own DNS-rebinding check is off: these routes are only served behind the HTTP
    guard (``build_http_app``), which checks Host and Origin for every route alike.
    """
    unchecked = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    streamable = server.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=unchecked)
    sse = server.sse_app(sse_path=SSE_PATH, message_path=SSE_MESSAGE_PATH, transport_security=unchecked)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        async with server.session_manager.run():
            yield

    return [*streamable.routes, *sse.routes], lifespan


def build_http_app(
    server: MCPServer, guard: HttpGuard, *, extra_routes: Sequence[BaseRoute] = ()
) -> Starlette:
    """The one HTTP app: both MCP transports and ``extra_routes`` (the REST gateway's) in one
    router, behind ``guard.middleware()``; an unknown path or a wrong method is a problem too."""
    routes, session_lifespan = mcp_http_routes(server)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with session_lifespan():
            yield

    return Starlette(
        routes=[*routes, *extra_routes],
        middleware=guard.middleware(),
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
