"""opspawn's MCP log notifications (``notifications/message``), sent only at levels the client wants.

The level is kept per session on 2025-11-25 and read from each request's ``_meta`` on
2026-07-28. See docs/mcp-server.md, "Two protocol eras, and MCP Tasks".
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, get_args

from mcp.server.connection import allowed_log_levels
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context
from mcp_types import (
    LoggingLevel,
    LoggingMessageNotification,
    LoggingMessageNotificationParams,
    SetLevelRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

LEVELS: tuple[LoggingLevel, ...] = get_args(LoggingLevel)
DEFAULT_LEVEL: LoggingLevel = "info"
MAX_SESSIONS = 4096
"""Sessions whose level is remembered; the oldest is forgotten first (it falls back to ``info``)."""


def session_key(request: Any) -> str:
    """The session a request belongs to: the header or query parameter its transport uses."""
    if request is None:
        return "stdio"
    return str(request.headers.get("mcp-session-id") or request.query_params.get("session_id") or "")


class SessionLogLevels:
    """Each 2025-11-25 session's ``logging/setLevel`` choice, and the log sender that honours it."""

    def __init__(self) -> None:
        self._levels: OrderedDict[str, LoggingLevel] = OrderedDict()

    async def set_level(
        self, ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams
    ) -> dict[str, Any]:
        """The ``logging/setLevel`` handler: remember the level for this session; an empty ack."""
        key = session_key(ctx.request)
        self._levels[key] = params.level
        self._levels.move_to_end(key)
        while len(self._levels) > MAX_SESSIONS:
            self._levels.popitem(last=False)
        return {}

    def allowed(self, ctx: Context) -> frozenset[LoggingLevel]:
        request = ctx.request_context
        if request.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return allowed_log_levels(request.protocol_version, request.meta)
        level = self._levels.get(session_key(request.request), DEFAULT_LEVEL)
        return frozenset(LEVELS[LEVELS.index(level) :])

    async def log(self, ctx: Context, level: LoggingLevel, data: Any, *, logger: str = "opspawn") -> None:
        """Send one log notification on this request's stream if the client wants ``level``."""
        if level not in self.allowed(ctx):
            return
        notification = LoggingMessageNotification(
            params=LoggingMessageNotificationParams(level=level, data=data, logger=logger)
        )
        await ctx.request_context.session.send_notification(notification, related_request_id=ctx.request_id)
