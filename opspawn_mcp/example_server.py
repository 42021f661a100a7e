"""The downstream MCP server opspawn attaches by default, so a fresh install has tools to call.

Small, predictable tools that touch neither the network nor the disk; logs go to stderr.
See docs/configuration.md, "The example server".
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

MAX_SLEEP_S = 30.0
"""``sleep`` is for demos of progress and cancellation; longer waits only tie up a worker slot."""

MAX_TEXT_CHARS = 100_000

logger = logging.getLogger("opspawn.example_server")

server: MCPServer = MCPServer(
    "opspawn-example",
    instructions=(
        "Small deterministic utilities shipped with opspawn: echo text, add numbers, count words, "
        "read the UTC clock, and sleep with progress reports."
    ),
    log_level="WARNING",
)


@server.tool(description="Return the given text unchanged. Useful to check that tool calls work end to end.")
def echo(text: Annotated[str, Field(description="Text to send back.", max_length=MAX_TEXT_CHARS)]) -> str:
    return text


@server.tool(description="Add two numbers and return the sum.")
def add(
    a: Annotated[float, Field(description="First addend.")],
    b: Annotated[float, Field(description="Second addend.")],
) -> float:
    return a + b


@server.tool(
    description="Count the words in a text: runs of non-whitespace characters, as str.split() sees them."
)
def word_count(
    text: Annotated[str, Field(description="The text to count.", max_length=MAX_TEXT_CHARS)],
) -> int:
    return len(text.split())


@server.tool(description="The current date and time in UTC, as an ISO 8601 string with a +00:00 offset.")
def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@server.tool(
    description=(
        f"Wait for the given number of seconds (at most {MAX_SLEEP_S:g}), reporting progress about "
        "ten times, then return how long it slept. Cancelling the call stops the wait."
    )
)
async def sleep(
    seconds: Annotated[float, Field(description="How long to wait, in seconds.", ge=0)],
    ctx: Context,
) -> str:
    if seconds > MAX_SLEEP_S:
        raise ToolError(f"seconds must be at most {MAX_SLEEP_S:g}; split a longer wait into several calls")
    steps = 10
    for step in range(steps):
        await anyio.sleep(seconds / steps)
        await ctx.report_progress(step + 1, steps, f"slept {seconds * (step + 1) / steps:.2f}s")
    return f"slept {seconds:g}s"


def add_transport_options(parser: argparse.ArgumentParser, port: int) -> None:
    """``--transport`` (stdio by default, or HTTP) and, for HTTP, ``--host`` and ``--port``."""
    parser.add_argument("--transport", choices=["stdio", "sse", "streamable-http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)


def run(mcp_server: MCPServer, args: argparse.Namespace) -> None:
    """Serve ``mcp_server`` on the transport of ``args`` (``add_transport_options``) until it ends."""
    if args.transport == "stdio":
        mcp_server.run("stdio")
    else:
        mcp_server.run(args.transport, host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> None:
    """Run over stdio (the default attachment) or over HTTP for trying the server by hand."""
    parser = argparse.ArgumentParser(prog="python -m opspawn_mcp.example_server", description=__doc__)
    add_transport_options(parser, port=8766)
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    run(server, args)


if __name__ == "__main__":
    main()
