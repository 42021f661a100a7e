"""A small real MCP server for the host pool's tests, the same tools on stdio, SSE and streamable HTTP.

Each tool exists to provoke one behaviour of a client: ``sleep`` records on disk that it was
cancelled (so a test proves the cancellation crossed the wire, not that the client gave up),
``fail`` returns ``isError``, ``crash`` kills the process mid-call, ``add_tool`` changes the tool
list and announces it (``add_content`` a resource and a prompt; the server also has a fixed
resource, a resource template and a prompt), ``pid`` tells a test which process answered. ``--pid-log`` appends the pid
at start, so a test counts how many processes a client started; ``--exit-if-exists`` keeps it from
starting while a file exists (a server that stays down); ``--ignore-stdin-close`` makes
the process ignore stdin EOF and SIGTERM, the worst case for a client's shutdown. ``echo_meta``
returns the request's ``_meta`` (idempotency keys); ``put_value`` and ``charge`` are annotated
idempotent and not, for a client's re-run policy.

    python -m tests.servers.testing_server --transport stdio|sse|streamable-http --port N
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations

from opspawn_mcp.example_server import add_transport_options, run

server: MCPServer = MCPServer("opspawn-testing", log_level="WARNING")
_cancel_file: Path | None = None


def _record(line: str) -> None:
    if _cancel_file is not None:
        with _cancel_file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


@server.tool(description="Return the text unchanged.")
def echo(text: str) -> str:
    return text


@server.tool(description="Return this server process's pid.")
def pid() -> int:
    return os.getpid()


@server.tool(
    description="Sleep, reporting progress; record 'cancelled <tag>' to the cancel file if cancelled."
)
async def sleep(seconds: float, ctx: Context, tag: str = "") -> str:
    _record(f"started {tag}")
    try:
        steps = max(1, int(seconds * 10))
        for step in range(steps):
            await anyio.sleep(seconds / steps)
            await ctx.report_progress(step + 1, steps)
    except anyio.get_cancelled_exc_class():
        _record(f"cancelled {tag}")
        raise
    _record(f"finished {tag}")
    return f"slept {seconds}"


@server.tool(description="Return a tool error (isError) with the given message.")
def fail(message: str = "failed on purpose") -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


@server.tool(description="Exit the process at once, without answering; print `message` to stderr first.")
def crash(code: int = 3, message: str = "") -> str:
    if message:
        print(message, file=sys.stderr, flush=True)
    os._exit(code)


@server.tool(description="Return an HTTP request header of this call (lower-case name), or ''.")
def header(name: str, ctx: Context) -> str:
    headers = ctx.headers or {}
    return headers.get(name, "")


@server.tool(description="Return the value of an environment variable of this process, or ''.")
def env(name: str) -> str:
    return os.environ.get(name, "")


@server.tool(description="Add a tool named `name` that echoes, then send notifications/tools/list_changed.")
async def add_tool(name: str, ctx: Context) -> str:
    def added(text: str = "") -> str:
        return f"{name}: {text}"

    server.add_tool(added, name=name, description=f"Added at runtime as {name}.")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


@server.resource("testing://greeting", name="greeting", description="A fixed text.", mime_type="text/plain")
def greeting() -> str:
    return "hello from the testing server"


@server.resource("testing://items/{item}", name="item", description="One item by name.")
def item(item: str) -> str:
    return f"item {item}"


@server.prompt(name="greet", description="Ask for a greeting.")
def greet(name: str) -> str:
    return f"Say hello to {name}."


@server.tool(
    description="Add a resource testing://added/`name` and a prompt `name`, then send both list_changed."
)
async def add_content(name: str, ctx: Context) -> str:
    def added_resource() -> str:
        return f"added resource {name}"

    def added_prompt() -> str:
        return f"added prompt {name}"

    server.resource(f"testing://added/{name}", name=name)(added_resource)
    server.prompt(name=name)(added_prompt)
    await ctx.session.send_resource_list_changed()
    await ctx.session.send_prompt_list_changed()
    return f"added {name}"


@server.tool(description="Write a line to stderr (tests read it back from the client's log).")
def say_stderr(text: str) -> str:
    print(text, file=sys.stderr, flush=True)
    return "ok"


@server.tool(description="Send `text` to the client as an MCP log message (notifications/message).")
async def log_message(text: str, ctx: Context) -> str:
    await ctx.warning(text)
    return "ok"


@server.tool(
    description="Return the request's `_meta` as JSON (tests check idempotency keys arrive).",
    annotations=ToolAnnotations(read_only_hint=True),
)
def echo_meta(ctx: Context) -> str:
    return json.dumps(dict(ctx.request_context.meta or {}), default=str, sort_keys=True)


@server.tool(
    description="Pretend to store `value` under `key`; annotated idempotent (a re-run is harmless).",
    annotations=ToolAnnotations(read_only_hint=False, idempotent_hint=True),
)
def put_value(key: str, value: str) -> str:
    return f"{key}={value}"


@server.tool(
    description="Pretend to charge `amount`; annotated not idempotent (a re-run charges twice).",
    annotations=ToolAnnotations(read_only_hint=False, idempotent_hint=False, destructive_hint=True),
)
def charge(amount: float) -> str:
    return f"charged {amount}"


def _linger(*_: Any) -> None:
    """After stdin closes, ignore SIGTERM and stay alive: only SIGKILL ends the process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    global _cancel_file
    parser = argparse.ArgumentParser(prog="python -m tests.servers.testing_server")
    add_transport_options(parser, port=0)
    parser.add_argument("--cancel-file", default=os.environ.get("TESTING_SERVER_CANCEL_FILE"))
    parser.add_argument("--pid-log", default=os.environ.get("TESTING_SERVER_PID_LOG"))
    parser.add_argument("--ignore-stdin-close", action="store_true")
    parser.add_argument("--tag", default="", help="ignored; lets a test find its own processes")
    parser.add_argument("--exit-if-exists", help="exit at once (code 4) while this file exists")
    args = parser.parse_args(argv)
    if args.exit_if_exists and Path(args.exit_if_exists).exists():
        print(f"testing server: {args.exit_if_exists} exists, exiting", file=sys.stderr, flush=True)
        sys.exit(4)
    _cancel_file = Path(args.cancel_file) if args.cancel_file else None
    if args.pid_log:
        with open(args.pid_log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    print(f"testing server {os.getpid()} starting on {args.transport}", file=sys.stderr, flush=True)
    run(server, args)
    if args.transport == "stdio" and args.ignore_stdin_close:
        _linger()


if __name__ == "__main__":
    main()
