"""Bearer-token check for the REST gateway: the same rule as the MCP HTTP transport.

With a token configured, a request needs ``Authorization: Bearer <token>`` or it gets a 401
problem (with ``WWW-Authenticate``). Liveness and readiness probes stay open, because
orchestrators probe without credentials and the answers reveal nothing about tasks.
The token check itself is ``opspawn_mcp.server.bearer_ok`` (constant-time), shared with MCP; this
middleware exists only to answer in the gateway's problem+json and to leave the probes open.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.problems import error_response
from opspawn_mcp.errors import Unauthenticated
from opspawn_mcp.server import bearer_ok

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class BearerAuth:
    """Pure ASGI middleware, so it does not buffer or wrap the SSE stream it lets through."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Collection[str] = OPEN_PATHS) -> None:
        self.app = app
        self.token = token
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if bearer_ok(request.headers.get("authorization"), self.token):
            await self.app(scope, receive, send)
            return
        response = error_response(
            Unauthenticated("Send the server's token as 'Authorization: Bearer <token>'.")
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="opspawn"'
        await response(scope, receive, send)
