"""The one guard in front of every HTTP route: MCP (streamable HTTP, SSE), REST and the probes.

``HttpGuard.middleware()`` is the whole rule as one list of pure ASGI middleware: Host, CORS,
Origin, bearer token (or the dashboard's cookie under ``/ui``), content type. See docs/rest.md,
"The HTTP guard", and docs/security.md.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import cookie_parser
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from gateway.problems import error_response, problem_response
from opspawn_mcp.config import LOCALHOSTS
from opspawn_mcp.errors import (
    Forbidden,
    MisdirectedRequest,
    Unauthenticated,
    UnsupportedMediaType,
)
from opspawn_mcp.principals import PRINCIPAL_SCOPE_KEY, Principals

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
"""Open without a token: orchestrators probe without credentials, and the answers name no task."""
DASHBOARD_PATH = "/ui"
DASHBOARD_SIGN_IN = "/ui/login"
DASHBOARD_STATIC = "/ui/static/"
"""The sign-in page and the dashboard's script and styles are open: they hold no task data."""
DASHBOARD_COOKIE = "opspawn_token"
"""The dashboard's HttpOnly cookie holding the token; the guard reads it under ``/ui`` only."""
SAFE_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_MEDIA_TYPE = "application/json"
WWW_AUTHENTICATE = 'Bearer realm="opspawn"'
CORS_METHODS = ("GET", "POST", "DELETE")
CORS_ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
)
CORS_EXPOSE_HEADERS = ("mcp-session-id", "location", "retry-after")

Check = Callable[[Scope, Headers], Response | None]


def host_patterns(host: str, port: int, allowed_hosts: Sequence[str] = ()) -> frozenset[str]:
    """The Host header values this server answers to (lower case; ``name:*`` means any port).

    Its own names count on the served port and bare (behind a proxy on the default port); port
    0 (not yet known) means any. A wildcard bind has no single name, so it takes the machine's
    names. An ``allowed_hosts`` entry ``name`` allows any port, ``name:port`` that port only.
    """
    names = list(LOOPBACK_NAMES)
    if host not in LOCALHOSTS:
        if host in WILDCARD_BINDS:
            names += [socket.gethostname(), socket.getfqdn()]
        else:
            names.append(f"[{host}]" if ":" in host else host)
    suffix = f":{port}" if port else ":*"
    patterns = {p for name in names for p in (name.lower() + suffix, name.lower())}
    for entry in (e.strip().lower() for e in allowed_hosts):
        patterns |= {entry} if _split_authority(entry)[1] is not None else {entry, entry + ":*"}
    return frozenset(patterns)


def _split_authority(value: str) -> tuple[str, str | None]:
    """``name[:port]`` as (name, port or None); an IPv6 literal keeps its brackets."""
    head, sep, port = value.rpartition(":")
    if not sep or len(head) < value.rfind("]"):  # no colon, or the last one is inside [...]
        return value, None
    return head, port


@dataclass(frozen=True)
class HttpGuard:
    """What the guard accepts: the Host values (``host_patterns``), the cross-origin browser
    origins (``allowed_origins``, lower case) and the callers (``principals``)."""

    principals: Principals
    hosts: frozenset[str]
    allowed_origins: tuple[str, ...] = ()

    @classmethod
    def for_server(
        cls,
        principals: Principals,
        host: str,
        port: int,
        *,
        allowed_hosts: Sequence[str] = (),
        allowed_origins: Sequence[str] = (),
    ) -> HttpGuard:
        """The guard of a server bound to ``host:port`` (pass the real port, not 0, once known)."""
        origins = tuple(dict.fromkeys(o.lower() for o in allowed_origins))
        return cls(principals, host_patterns(host, port, allowed_hosts), origins)

    def middleware(self) -> list[Middleware]:
        """The stack, outermost first, for ``Starlette(middleware=...)``."""
        stack = [Middleware(_Guarded, check=self.check_host)]
        if self.allowed_origins:
            stack.append(
                Middleware(
                    _Cors,
                    allow_origins=self.allowed_origins,
                    allow_methods=CORS_METHODS,
                    allow_headers=CORS_ALLOW_HEADERS,
                    expose_headers=CORS_EXPOSE_HEADERS,
                )
            )
        stack += [
            Middleware(_Guarded, check=self.check_origin),
            Middleware(_Guarded, check=self.authenticate),
            Middleware(_Guarded, check=check_json_body),
        ]
        return stack

    def host_ok(self, host: str | None) -> bool:
        value = (host or "").strip().lower()
        if value in self.hosts:
            return True
        name, port = _split_authority(value)
        return bool(value) and port is not None and port.isdigit() and f"{name}:*" in self.hosts

    def origin_ok(self, origin: str) -> bool:
        """An allowed origin, or this server's own."""
        return origin.strip().lower() in self.allowed_origins or self.own_origin(origin)

    def own_origin(self, origin: str) -> bool:
        """This server's own origin: http(s) on a Host value it answers to."""
        scheme, sep, authority = origin.strip().lower().partition("://")
        return bool(sep) and scheme in ("http", "https") and "/" not in authority and self.host_ok(authority)

    # -- the checks: None lets the request through ------------------------------------------

    def check_host(self, scope: Scope, headers: Headers) -> Response | None:
        host = headers.get("host")
        if self.host_ok(host):
            return None
        return error_response(
            MisdirectedRequest(
                f"This server does not answer to Host {host!r}. Behind a reverse proxy, add the "
                "name clients use to opspawn.server.allowed_hosts.",
                host=host,
            )
        )

    def check_origin(self, scope: Scope, headers: Headers) -> Response | None:
        origin = headers.get("origin")
        if is_dashboard(scope["path"]) and scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            if origin is not None and self.own_origin(origin):
                return None
            sent = "no Origin header" if origin is None else f"the origin {origin!r}"
            why = (
                f"A dashboard action must come from the dashboard's own page, and this request "
                f"carries {sent}. Use the dashboard at {DASHBOARD_PATH}; scripts use the REST "
                "API under /v1 with a bearer token."
            )
        elif origin is None or self.origin_ok(origin):
            return None
        else:
            why = (
                f"Requests from the web origin {origin!r} are not allowed; list it in "
                "opspawn.server.allowed_origins to let that site call this server."
            )
        return error_response(Forbidden(why, origin=origin))

    def authenticate(self, scope: Scope, headers: Headers) -> Response | None:
        path: str = scope["path"]
        if path in PROBE_PATHS or path == DASHBOARD_SIGN_IN or path.startswith(DASHBOARD_STATIC):
            return None
        dashboard = is_dashboard(path)
        authorization = headers.get("authorization")
        if authorization is None and dashboard:
            token = cookie_parser(headers.get("cookie", "")).get(DASHBOARD_COOKIE)
            authorization = f"Bearer {token}" if token else None
        principal = self.principals.authenticate(authorization)
        if principal is None:
            if dashboard and scope.get("method") in SAFE_METHODS:
                return RedirectResponse(sign_in_url(scope), status_code=303)
            hint = f"Sign in at {DASHBOARD_SIGN_IN}." if dashboard else ""
            error = Unauthenticated(f"Send your token as 'Authorization: Bearer <token>'. {hint}".strip())
            return error_response(error, headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        scope[PRINCIPAL_SCOPE_KEY] = principal
        return None


def is_dashboard(path: str) -> bool:
    return path == DASHBOARD_PATH or path.startswith(DASHBOARD_PATH + "/")


def sign_in_url(scope: Scope) -> str:
    """The sign-in page, told to come back to the page asked for."""
    query = scope.get("query_string", b"").decode("latin-1")
    back = scope["path"] + (f"?{query}" if query else "")
    return f"{DASHBOARD_SIGN_IN}?{urlencode({'next': back})}"


def check_json_body(scope: Scope, headers: Headers) -> Response | None:
    """A POST/PUT/PATCH with a body, or with a declared type, must be JSON (``; charset=`` is
    fine); a body-less POST (cancel) needs no type."""
    if scope.get("method") not in BODY_METHODS:
        return None
    declared = headers.get("content-type")
    length = headers.get("content-length")
    has_body = "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))
    if declared is None and not has_body:
        return None
    media_type = (declared or "").split(";", 1)[0].strip().lower()
    if media_type == JSON_MEDIA_TYPE:
        return None
    error = UnsupportedMediaType(
        f"Send the body as {JSON_MEDIA_TYPE}, not {declared or 'without a Content-Type'}.",
        content_type=declared,
    )
    return error_response(error, headers={"Accept-Post": JSON_MEDIA_TYPE})


class _Guarded:
    """One layer: run ``check`` on each HTTP or WebSocket request; answer its refusal, or go on.

    A refused WebSocket is closed before it is accepted (policy violation): there is no body to
    carry a problem. Lifespan messages pass untouched.
    """

    def __init__(self, app: ASGIApp, check: Check) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            refusal = self.check(scope, Headers(scope=scope))
            if refusal is not None:
                closer = refusal if scope["type"] == "http" else WebSocketClose(code=1008)
                await closer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Cors(CORSMiddleware):
    """Starlette's CORS, with refusals as problems: a preflight from an origin not listed goes on
    to the Origin check (403); one asking for a method or header not allowed gets a 400 problem."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            preflight = "access-control-request-method" in headers
            if origin is not None and preflight and not self.is_allowed_origin(origin):
                await self.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        cors = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        detail = (
            f"{bytes(response.body).decode()}: this server allows the methods {', '.join(CORS_METHODS)} "
            f"and the headers {', '.join(CORS_ALLOW_HEADERS)}."
        )
        return problem_response(400, "cors_refused", detail, headers=cors)
