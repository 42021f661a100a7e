"""The URIs downstream resources have on opspawn's MCP server: ``opspawn+server://<server>/<uri>``.

The downstream URI is kept verbatim behind the server's name, so templates stay templates and
no two servers' URIs can clash. See docs/composition.md, "Resources and prompts of exposed servers".
"""

from __future__ import annotations

SCHEME = "opspawn+server"
PREFIX = f"{SCHEME}://"


def exposed_uri(server: str, uri: str) -> str:
    """The URI (or URI template) ``uri`` of ``server`` has on opspawn's MCP server."""
    return f"{PREFIX}{server}/{uri}"


def original_uri(uri: str) -> tuple[str, str] | None:
    """The (server, downstream URI) an exposed URI stands for, or None when it is not one."""
    if not uri.startswith(PREFIX):
        return None
    server, slash, original = uri[len(PREFIX) :].partition("/")
    if not server or not slash or not original:
        return None
    return server, original
