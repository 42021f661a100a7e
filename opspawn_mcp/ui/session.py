"""Signing in to the dashboard: the token goes into a cookie the HTTP guard reads under /ui.

See docs/security.md, "The dashboard's sign-in (`/ui`)".
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.app import read_body
from opspawn_mcp.errors import InvalidInput, Unauthenticated
from opspawn_mcp.http_guard import DASHBOARD_COOKIE, DASHBOARD_PATH, DASHBOARD_SIGN_IN, is_dashboard
from opspawn_mcp.principals import Principals

SIGN_IN_MAX_BYTES = 16 * 1024


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path of this server, never another site."""
    if target and is_dashboard(target.partition("?")[0]) and "\\" not in target:
        return target
    return DASHBOARD_PATH


async def sign_in(request: Request, principals: Principals) -> Response:
    """``{"token": ...}`` in, the cookie and ``{"principal", "next"}`` out; a wrong token is 401."""
    try:
        body: Any = json.loads(await read_body(request, SIGN_IN_MAX_BYTES))
    except (ValueError, RecursionError):
        body = None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token.strip():
        raise InvalidInput('Send {"token": "<your token>"} as JSON.', field="token")
    principal = principals.authenticate(f"Bearer {token.strip()}")
    if principal is None:
        raise Unauthenticated(
            "That token is not one this server accepts: use one named in opspawn.server.tokens."
        )
    answer = JSONResponse({"principal": principal.name, "next": safe_next(request.query_params.get("next"))})
    if principals.auth_required:
        answer.set_cookie(
            DASHBOARD_COOKIE,
            token.strip(),
            path=DASHBOARD_PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return answer


def sign_out() -> Response:
    answer = JSONResponse({"next": DASHBOARD_SIGN_IN})
    answer.delete_cookie(DASHBOARD_COOKIE, path=DASHBOARD_PATH, httponly=True, samesite="strict")
    return answer
