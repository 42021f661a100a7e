"""What ``list_servers`` reports about each downstream server: plain data, no I/O to produce it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

ServerState = Literal["idle", "connecting", "ready", "unhealthy", "unavailable"]
"""``idle``: no session (not used yet, or the last one ended); ``connecting``: a session is opening;
``ready``: a session is open and its tool list is cached; ``unhealthy``: the last session was closed
because ``max_timeouts`` calls in a row got no answer (a frozen server), and the next call replaces
it; ``unavailable``: connecting failed several times in a row, so calls fail fast until the backoff
delay has passed."""


class HiddenTool(BaseModel):
    """A tool the server lists that its ``tools`` filter hides from agents and MCP clients."""

    name: str
    reason: str = Field(description="The filter entry that hides it, e.g. \"excluded by 'delete_*'\".")


class CallRecord(BaseModel):
    """One call an MCP client made through opspawn's exposed tools (``mcpServers.X.expose``)."""

    at: datetime
    by: str = Field(description="The principal that made the call.")
    tool: str
    error: str | None = Field(default=None, description="Why it failed; None when it succeeded.")


class ServerInfo(BaseModel):
    """One downstream server as this process's pool sees it. Never holds a secret's value."""

    name: str
    transport: Literal["stdio", "sse", "streamable-http"]
    state: ServerState
    tools: list[str] = Field(
        default_factory=list, description="Cached tool names agents may use, from the last tools/list."
    )
    tool_count: int = 0
    hidden: list[HiddenTool] = Field(
        default_factory=list, description="Tools the server lists that mcpServers.<name>.tools hides."
    )
    unmatched: list[str] = Field(
        default_factory=list,
        description="Entries of mcpServers.<name>.tools that match no listed tool (a typo?).",
    )
    last_error: str | None = Field(default=None, description="The last failure, with secrets redacted.")
    calls: int = Field(default=0, description="tools/call requests made through this pool.")
    errors: int = Field(default=0, description="Calls that failed or returned isError.")
    opspawn_instance: str | None = Field(
        default=None,
        description="The instance id of a downstream opspawn (it advertises io.opspawn/chaining): "
        "delegating to it is chaining (docs/composition.md); null for other servers.",
    )
    recent_calls: list[CallRecord] = Field(
        default_factory=list,
        description="The last calls made through opspawn's exposed tools, newest last (admins see everyone's).",
    )
