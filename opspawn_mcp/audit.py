"""The audit of exposed calls: each tool call, resource read and prompt get an MCP client makes
through ``mcpServers.X.expose`` is logged on ``opspawn_mcp.audit`` and kept in the store.

See docs/composition.md, "The audit of exposed calls".
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from mcp.shared.exceptions import MCPError

from agentkit.errors import ToolError
from opspawn_mcp.errors import OpspawnError
from opspawn_mcp.models import AUDIT_ARGUMENTS_MAX_CHARS, ExposedCall, ExposedKind

audit = logging.getLogger("opspawn_mcp.audit")
logger = logging.getLogger("opspawn_mcp.exposed")

RECORD_TIMEOUT_S = 10.0
"""The longest keeping one record may take (shielded from the caller's cancellation)."""
CANCELLED = "cancelled by the client"
_VERBS: dict[ExposedKind, str] = {"tool": "called", "resource": "read", "prompt": "got prompt"}
_T = TypeVar("_T")
Keep = Callable[[ExposedCall], Awaitable[None]]
Redact = Callable[[str, str], str]
"""(server, text) -> the text with that server's secret values replaced."""


@dataclass(frozen=True)
class ExposedRequest:
    """What one exposed request is, as its record names it: who, on which server, which kind, the
    name (a tool's or a prompt's, or the resource's downstream URI) and the arguments."""

    principal: str
    server: str
    kind: ExposedKind
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class AuditTrail:
    """Runs an exposed request and records it: ``keep`` stores the record (``TaskService.record_call``;
    None keeps the log line only), ``redact`` hides a server's secrets in its arguments."""

    def __init__(self, keep: Keep | None, redact: Redact) -> None:
        self._keep = keep
        self._redact = redact

    async def run(self, exposed: ExposedRequest, request: Callable[[], Awaitable[_T]]) -> _T:
        """``request()``'s answer, or its error re-raised, once the record of ``exposed`` is kept."""
        started = time.monotonic()
        error: str | None = CANCELLED
        try:
            result = await request()
        except (ToolError, OpspawnError, MCPError) as exc:
            error = exc.message
            raise
        else:
            error = None
            return result
        finally:
            server = exposed.server
            record = ExposedCall(
                principal=exposed.principal,
                server=server,
                kind=exposed.kind,
                name=exposed.name,
                arguments=self._arguments(server, exposed.arguments),
                outcome="ok" if error is None else "error",
                error=None if error is None else self._redact(server, error),
                duration_ms=(time.monotonic() - started) * 1000,
            )
            await self._record(record)

    def _arguments(self, server: str, arguments: dict[str, Any]) -> dict[str, Any]:
        text = self._redact(server, json.dumps(arguments, default=str, ensure_ascii=False))
        text = text.replace("\\u0000", "\\ufffd")
        if len(text) > AUDIT_ARGUMENTS_MAX_CHARS:
            return {"truncated": text[:AUDIT_ARGUMENTS_MAX_CHARS]}
        try:
            kept: dict[str, Any] = json.loads(text)
        except ValueError:  # a secret's value spanned JSON syntax: keep the redacted text
            return {"redacted": text}
        return kept

    async def _record(self, call: ExposedCall) -> None:
        outcome = "ok" if call.error is None else f"error: {call.error}"
        audit.info("%s %s %s/%s: %s", call.principal, _VERBS[call.kind], call.server, call.name, outcome)
        if self._keep is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(RECORD_TIMEOUT_S):
            try:
                await self._keep(call)
            except OpspawnError as exc:
                logger.warning(
                    "the audit record of %s's call %s/%s was not kept: %s",
                    call.principal,
                    call.server,
                    call.name,
                    exc.message,
                )
