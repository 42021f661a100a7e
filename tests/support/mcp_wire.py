"""The MCP messages the tests write by hand (raw JSON-RPC over a pipe or an HTTP body), and the
tool set the opspawn server offers at every MCP transport, each written once."""

from __future__ import annotations

from typing import Any

OPSPAWN_TOOLS = frozenset(
    {"submit_task", "get_status", "list_tasks", "cancel_task", "approve_task", "list_servers"}
)


def initialize_request(client: str, request_id: int | str = 1) -> dict[str, Any]:
    """The ``initialize`` request a client named ``client`` opens its session with."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": client, "version": "0"},
        },
    }


def tool_call_request(tool: str, arguments: dict[str, Any], request_id: int | str) -> dict[str, Any]:
    """A ``tools/call`` request for ``tool`` with ``arguments``."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }
