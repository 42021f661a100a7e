"""ops-core's MCP client side: the shared pool of sessions to downstream servers.

``OpsMcpClient`` and ``ScopedCaller`` both satisfy agentkit's ``McpCaller`` protocol, so
``mcp_proxy_tool`` plugs straight in. See docs/host.md.
"""

from opspawn_mcp.host.models import ServerInfo, ServerState
from opspawn_mcp.host.pool import OpsMcpClient, ScopedCaller

__all__ = ["OpsMcpClient", "ScopedCaller", "ServerInfo", "ServerState"]
