"""The bearer-token rule, written once for every door (MCP HTTP, REST, gRPC metadata).

With ``opspawn.server.auth_token_env`` configured, a request needs ``Authorization: Bearer
<token>``; without it, it gets a 401 RFC 9457 problem with ``WWW-Authenticate``. The problem shape
is a valid body for MCP clients too, so one middleware guards the whole HTTP app. Liveness and
readiness probes stay open: orchestrators probe without credentials, and the answers reveal
nothing about tasks.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from opspawn_mcp.errors import PROBLEM_MEDIA_TYPE, Unauthenticated

PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def bearer_ok(header: str | None, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>`` (scheme case-insensitive, RFC 6750).

    Constant-time, so the token cannot be recovered byte by byte from response timings.
    """
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class BearerAuth:
    """Pure ASGI middleware (not ``BaseHTTPMiddleware``), so the SSE streams it lets through are
    not buffered. ``open_paths`` stay reachable without a token."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Collection[str] = PROBE_PATHS) -> None:
        if not token:
            raise ValueError("BearerAuth needs a non-empty token")
        self.app = app
        self.token = token
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if bearer_ok(Request(scope).headers.get("authorization"), self.token):
            await self.app(scope, receive, send)
            return
        error = Unauthenticated("Send the server's token as 'Authorization: Bearer <token>'.")
        response = JSONResponse(
            error.problem(),
            status_code=error.status,
            media_type=PROBLEM_MEDIA_TYPE,
            headers={"WWW-Authenticate": 'Bearer realm="opspawn"'},
        )
        await response(scope, receive, send)
