"""The URIs downstream resources have on opspawn's MCP server: ``opspawn+server://<server>/<uri>``.

The downstream URI is kept verbatim after the server's name, so a resource template stays a
template (``opspawn+server://fs/file:///{path}`` expands as ``file:///{path}`` does) and the
original is the rest of the string after the first ``/`` past the name. Server names are
1-64 of ``[A-Za-z0-9_.-]`` (the config checks), valid as a URI authority and never containing
``/``, so two servers' URIs cannot clash, and none can equal one of opspawn's own
(``opspawn://``). See docs/composition.md.
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
