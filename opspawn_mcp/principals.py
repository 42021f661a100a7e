"""Who is calling: principals, the tokens that name them, and what each may use.

Every request at every door resolves to a ``Principal`` (a token's, or ``local``) before it
reaches ``TaskService``. See docs/configuration.md, "Principals: who may do what".
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opspawn_mcp.config import DEFAULT_PROFILE, LOCAL_PRINCIPAL, Config, Limits

LEGACY_TOKEN_PRINCIPAL = "default"
PRINCIPAL_SCOPE_KEY = "opspawn.principal"
"""Where the HTTP guard leaves the caller's ``Principal`` in the ASGI scope."""


@dataclass(frozen=True)
class Principal:
    """One caller's identity and rights; ``servers``/``models`` of None mean "all configured"."""

    name: str
    admin: bool = False
    servers: frozenset[str] | None = None
    models: tuple[str, ...] | None = None
    limits: Limits = field(default_factory=Limits)

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.name

    def may_use_server(self, name: str) -> bool:
        return self.servers is None or name in self.servers

    def may_use_profile(self, name: str) -> bool:
        return self.models is None or name in self.models

    @property
    def default_profile(self) -> str:
        """``default`` if allowed, else the first profile of the allowlist."""
        if self.models is None or DEFAULT_PROFILE in self.models:
            return DEFAULT_PROFILE
        return self.models[0]


LOCAL = Principal(LOCAL_PRINCIPAL, admin=True)
"""The local user with no limits: tests and in-process callers that stand for the machine's owner."""


def bearer_value(header: str | None) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive, RFC 6750), else None."""
    if not header:
        return None
    scheme, _, given = header.partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


class Principals:
    """The principals of one config; build once per process with ``from_config``."""

    def __init__(self, local: Principal, tokens: Mapping[str, Principal], *, required: bool) -> None:
        self.local = local
        self._tokens = {value: p for value, p in tokens.items() if value}
        self._required = required

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None) -> Principals:
        env = os.environ if environ is None else environ
        settings = config.opspawn
        base = settings.limits
        local = Principal(LOCAL_PRINCIPAL, admin=True, limits=base)
        tokens: dict[str, Principal] = {}
        if settings.server.auth_token_env:
            value = env.get(settings.server.auth_token_env, "").strip()
            tokens[value] = Principal(LEGACY_TOKEN_PRINCIPAL, admin=True, limits=base)
        for name, token in settings.server.tokens.items():
            tokens[env.get(token.token_env, "").strip()] = Principal(
                name,
                admin=token.admin,
                servers=None if token.servers is None else frozenset(token.servers),
                models=None if token.models is None else tuple(token.models),
                limits=token.limits.over(base),
            )
        # An unset variable is a config problem (``config check``), never a valid token: it is
        # dropped, and the server still demands a token, so it fails closed.
        required = bool(settings.server.auth_token_env or settings.server.tokens)
        return cls(local, tokens, required=required)

    @property
    def auth_required(self) -> bool:
        """True when the config defines tokens: then every HTTP/gRPC call must present one."""
        return self._required

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal an ``Authorization`` header names, or None (refuse the call).

        Without tokens configured every caller is ``local``. Every token is compared, in constant
        time, so the response time tells nothing about which token is closest.
        """
        if not self._required:
            return self.local
        given = (bearer_value(authorization) or "").encode()
        found: Principal | None = None
        for value, principal in self._tokens.items():
            if hmac.compare_digest(given, value.encode()):
                found = principal
        return found


def principal_of(scope: Mapping[str, Any]) -> Principal:
    """The caller the HTTP guard authenticated for this ASGI scope (a Starlette ``request.scope``).

    A route reached without the guard is a wiring bug, so this raises instead of guessing.
    """
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    if not isinstance(principal, Principal):
        raise RuntimeError("no principal in this request: the HTTP guard must wrap every route")
    return principal
