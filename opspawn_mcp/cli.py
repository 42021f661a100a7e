"""``opspawn-mcp``: the command line.

Parsing and error reporting live here; each command's work lives in the module that owns it, so
this file stays a table of contents. Every typed ``OpspawnError`` becomes one clear line on stderr
and exit code 2; a traceback reaching the user is a bug.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opspawn_mcp.config import Config, describe, find_config_path, load_config
from opspawn_mcp.errors import ConfigError, OpspawnError

if TYPE_CHECKING:
    from mcp.types import CallToolResult

EPILOG = """\
config: --config FILE, else $OPSPAWN_CONFIG, else ./opspawn.json, else the embedded default
(SQLite under the user's state dir, in-process broker and worker, the bundled example server).
Every key under "opspawn" has an OPSPAWN_* env override; see docs/configuration.md.
"""


def _load(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else find_config_path(args.config)
    config = load_config(path)
    print(
        f"{config.source}: OK ({len(config.mcp_servers)} server(s): {', '.join(config.mcp_servers) or 'none'})"
    )
    for line in describe(config):
        print(f"  {line}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _load(args)
    print(json.dumps(config.model_dump(mode="json", by_alias=True), indent=2))
    return 0


def _configure_logging() -> None:
    """INFO to stderr, minus the HTTP clients' and the MCP SDK's one line per request (two per
    task for the LLM alone: noise in the log, and measurable CPU in a busy worker)."""
    import logging

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpx2", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the runtime (store, pool, worker, MCP server) until stdin closes or a signal arrives.

    Logs go to stderr in every mode: with ``--stdio``, stdout carries the protocol and nothing else.
    """
    from opspawn_mcp.app import bind_http, check_bind
    from opspawn_mcp.principals import Principals

    config = _load(args)
    _configure_logging()
    sock = None
    if not args.stdio:
        # Refuse a bad bind (no token, port taken) before opening anything, so the error is
        # the only output.
        host = args.host or config.opspawn.server.host
        check_bind(host, Principals.from_config(config))
        sock = bind_http(host, config.opspawn.server.port if args.port is None else args.port)
    try:
        _run_loop(_serve(config, args, sock))
    finally:
        if sock is not None:
            sock.close()
    return 0


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (``uvicorn[standard]`` brings it: REST and MCP
    answer about a fifth faster), else on asyncio's own loop. uvicorn picks httptools by itself."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def _serve(config: Config, args: argparse.Namespace, sock: socket.socket | None) -> None:
    from opspawn_mcp.app import Runtime

    try:
        async with Runtime(config) as runtime:
            if sock is None:
                await runtime.serve_stdio()
            else:
                await runtime.serve_http(args.host, args.port, sock=sock)
    except BaseExceptionGroup as group:
        # Task groups (the MCP pool's) wrap what they propagate; a typed error inside is still
        # the one clear line main() prints, not a traceback.
        typed, _ = group.split(OpspawnError)
        if typed is None:
            raise
        first: BaseException = typed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one worker process against RabbitMQ and the configured store until SIGTERM/SIGINT."""

    from opspawn_mcp.worker import run_worker_process

    _configure_logging()
    return run_worker_process(_load(args))


DEFAULT_URL = "http://127.0.0.1:8765/mcp"
TOKEN_ENV = "OPSPAWN_TOKEN"
"""The client commands' bearer token (a principal's token); else the single auth_token_env one."""
RESPONSE_MARGIN_S = 60.0
"""How long a server may take to answer beyond the work asked of it (a ``--wait``)."""


def cmd_submit(args: argparse.Namespace) -> int:
    arguments: dict[str, object] = {"goal": args.goal, "wait": args.wait}
    if args.servers:
        arguments["servers"] = args.servers
    if args.max_steps is not None:
        arguments["max_steps"] = args.max_steps
    # The server answers only when the wait ends, so the client must wait longer than that.
    return _remote(args, "submit_task", arguments, timeout_s=max(args.wait, 0.0) + RESPONSE_MARGIN_S)


def cmd_status(args: argparse.Namespace) -> int:
    return _remote(args, "get_status", {"task_id": args.task_id})


def cmd_servers(args: argparse.Namespace) -> int:
    return _remote(args, "list_servers", {})


def _remote(
    args: argparse.Namespace, tool: str, arguments: dict[str, object], *, timeout_s: float = RESPONSE_MARGIN_S
) -> int:
    """Call one tool of a running server over streamable HTTP and print its answer as JSON.

    These commands are MCP clients like any other, so they see exactly what an assistant sees.
    The bearer token comes from ``$OPSPAWN_TOKEN`` (a principal's token), else from the variable
    ``auth_token_env`` names, never from the command line (where ``ps`` would show it).
    """
    import asyncio
    import os

    config = _load(args)
    url = args.url or os.environ.get("OPSPAWN_URL") or DEFAULT_URL
    token_env = config.opspawn.server.auth_token_env
    token = os.environ.get(TOKEN_ENV) or (os.environ.get(token_env) if token_env else None)
    try:
        result = asyncio.run(_call_tool(url, token, tool, arguments, timeout_s))
    except _Unreachable as exc:
        print(f"opspawn-mcp: {exc}", file=sys.stderr)
        return 2
    if result.is_error:
        text = "".join(getattr(block, "text", "") for block in result.content)
        print(f"opspawn-mcp: {text.removeprefix(f'Error executing tool {tool}: ')}", file=sys.stderr)
        return 2
    print(json.dumps(result.structured_content, indent=2))
    return 0


class _Unreachable(Exception):
    """The server could not be reached or refused us; the message is the one line to show."""


async def _call_tool(
    url: str, token: str | None, tool: str, arguments: dict[str, object], timeout_s: float = RESPONSE_MARGIN_S
) -> CallToolResult:
    """One ``tools/call``; the answer may take up to ``timeout_s`` (HTTP read and MCP request alike)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    refused: list[int] = []

    async def note_refusal(response: httpx2.Response) -> None:
        # The MCP client turns an HTTP 401 into a generic JSON-RPC error; keep the status.
        if response.status_code in (401, 403):
            refused.append(response.status_code)

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            httpx2.AsyncClient(
                headers=headers,
                timeout=httpx2.Timeout(30.0, read=timeout_s),
                event_hooks={"response": [note_refusal]},
            ) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            return await client.call_tool(tool, arguments, read_timeout_seconds=timeout_s)
    except Exception as exc:
        if refused:
            hint = (
                "check the token"
                if token
                else f"set {TOKEN_ENV} to your token (a token of opspawn.server.tokens)"
            )
            raise _Unreachable(
                f"the opspawn server at {url} refused the request (HTTP {refused[0]}): {hint}"
            ) from None
        raise _Unreachable(_reason(url, exc, timeout_s)) from None


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside ``exc``: exception groups (task groups) unwrapped, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _reason(url: str, exc: BaseException, timeout_s: float = RESPONSE_MARGIN_S) -> str:
    """One line naming the real cause, whatever the MCP client wrapped it in.

    Checked from the most to the least specific: a server that went away mid-request (it
    crashed or stopped; later cleanup requests then fail to connect too), no server at all, a
    timeout, and otherwise the first underlying error by type and message.
    """
    import httpx2

    leaves = _leaves(exc)
    related: list[BaseException] = []
    for leaf in leaves:
        err: BaseException | None = leaf
        while err is not None and err not in related:
            related.append(err)
            err = err.__cause__ or err.__context__
    if any(isinstance(e, httpx2.RemoteProtocolError | httpx2.ReadError) for e in related):
        return (
            f"the opspawn server at {url} closed the connection before answering: it stopped or "
            "crashed; check its log"
        )
    if any(isinstance(e, httpx2.ConnectError | httpx2.ConnectTimeout | ConnectionError) for e in related):
        return f"no opspawn server at {url}: start one with `opspawn-mcp serve`"
    if any(isinstance(e, httpx2.TimeoutException | TimeoutError) for e in related):
        return f"the opspawn server at {url} did not answer within {timeout_s:g} s"
    first = leaves[0]
    detail = str(first).strip()
    return f"could not talk to the opspawn server at {url}: {type(first).__name__}" + (
        f": {detail}" if detail else ""
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opspawn-mcp",
        description="MCP-native orchestration server for LLM agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="config file (JSON)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the MCP server (stdio, SSE, streamable HTTP) with the embedded worker",
        description="Run opspawn as an MCP server. Without --stdio it serves streamable HTTP at /mcp "
        "and SSE at /sse on opspawn.server.host:port (127.0.0.1:8765 by default).",
    )
    serve.add_argument("--stdio", action="store_true", help="speak MCP over stdin/stdout (logs go to stderr)")
    serve.add_argument("--host", help="bind address (overrides opspawn.server.host)")
    serve.add_argument("--port", type=int, help="port (overrides opspawn.server.port)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser(
        "worker",
        help="run a worker process that executes agent tasks from RabbitMQ",
        description="Consume execute_agent_task_actor messages from opspawn.broker_url (amqp://...). "
        "The embedded broker needs no separate worker: serve runs one in-process.",
    )
    worker.set_defaults(func=cmd_worker)

    submit = sub.add_parser(
        "submit",
        help="submit a task to a running server",
        description="Submit a task to a running opspawn server over MCP and print it as JSON.",
    )
    submit.add_argument("goal", help="what the agent must do")
    submit.add_argument(
        "--server", action="append", dest="servers", help="allowed downstream server (repeatable)"
    )
    submit.add_argument("--max-steps", type=int)
    submit.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the result")
    submit.add_argument("--url", help="server URL (default http://127.0.0.1:8765/mcp)")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser(
        "status", help="show a task", description="Show a task's status, result or error."
    )
    status.add_argument("task_id")
    status.add_argument("--url", help="server URL (default http://127.0.0.1:8765/mcp)")
    status.set_defaults(func=cmd_status)

    servers = sub.add_parser(
        "servers",
        help="list the downstream MCP servers",
        description="List the configured downstream MCP servers with their state and tools.",
    )
    servers.add_argument("--url", help="server URL (default http://127.0.0.1:8765/mcp)")
    servers.set_defaults(func=cmd_servers)

    config = sub.add_parser("config", help="check or show the config", description="Config file tools.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate a config file",
        description="Validate FILE (or the file opspawn would use) and print every problem with its JSON path.",
    )
    check.add_argument("file", nargs="?", help="config file to check")
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser(
        "show", help="print the effective config (defaults and env overrides applied)"
    )
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"opspawn-mcp: invalid config {exc.message}", file=sys.stderr)
        return 2
    except OpspawnError as exc:
        print(f"opspawn-mcp: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
