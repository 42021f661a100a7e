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
from contextlib import AbstractContextManager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from opspawn_mcp.config import (
    DEFAULTS_SOURCE,
    EXAMPLE_SERVER_NAME,
    Config,
    describe,
    example_server_config,
    find_config_path,
    load_config,
)
from opspawn_mcp.errors import ConfigError, Door, OpspawnError
from opspawn_mcp.models import TaskStatus

EPILOG = """\
config: --config FILE, else $OPSPAWN_CONFIG, else ./opspawn.json, else the embedded default
(SQLite under the user's state dir, in-process broker and worker, the bundled example server).
Every key under "opspawn" has an OPSPAWN_* env override; see docs/configuration.md.
"""
FOLLOW_EPILOG = """\
The server: --url, else $OPSPAWN_URL, else http://127.0.0.1:8765/mcp; the token: $OPSPAWN_TOKEN.
Exit codes: 0 done (a followed task completed), 1 a followed task failed, 3 it was cancelled,
2 an error (bad arguments, no server, refused, no such task).
"""


def _load(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else find_config_path(args.config)
    config = load_config(path)
    print(
        f"{config.source}: OK ({len(config.mcp_servers)} server(s): {', '.join(config.mcp_servers) or 'none'})"
    )
    for line in server_warnings(config):
        print(f"  {line}")
    for line in describe(config):
        print(f"  {line}")
    return 0


NO_SERVERS = "no downstream MCP servers: agents get no tools and answer from the model alone"


def server_warnings(config: Config) -> list[str]:
    """What a config file's ``mcpServers`` leaves out that a newcomer expects: any server at all,
    and the bundled example server, which the embedded default (no file) attaches; and tool
    filters that can be seen to do nothing without starting the server (the pool warns about the
    rest once it has the tool list, and ``list_servers`` shows them as ``unmatched``)."""
    warnings = []
    if not config.mcp_servers:
        warnings.append(f"warning: {NO_SERVERS}")
    for name, server in config.mcp_servers.items():
        warnings += [f"warning: mcpServers.{name}.tools: {line}" for line in server.tools.static_warnings()]
    if config.source != DEFAULTS_SOURCE and EXAMPLE_SERVER_NAME not in config.mcp_servers:
        example = example_server_config()
        entry = json.dumps({"command": example.command, "args": example.args})
        warnings.append(
            "note: the bundled example server is not attached (a config file's mcpServers replace "
            f'the embedded default); to keep it, add "{EXAMPLE_SERVER_NAME}": {entry} to mcpServers'
        )
    return warnings


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _load(args)
    print(json.dumps(config.model_dump(mode="json", by_alias=True), indent=2))
    return 0


def _observed(args: argparse.Namespace, config: Config) -> AbstractContextManager[bool]:
    """Logs in ``--log-format`` (else ``opspawn.telemetry.log_format``) and, when an OTLP endpoint
    is configured, traces for the block (``opspawn_mcp.telemetry``)."""
    from opspawn_mcp.telemetry.logs import configure_logging
    from opspawn_mcp.telemetry.tracing import traced

    configure_logging(args.log_format or config.opspawn.telemetry.log_format)
    return traced(config.opspawn.telemetry)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the runtime (store, pool, worker, MCP server) until stdin closes or a signal arrives.

    Logs go to stderr in every mode: with ``--stdio``, stdout carries the protocol and nothing else.
    """
    import logging

    from opspawn_mcp.principals import Principals
    from opspawn_mcp.runtime import bind_http, check_bind

    config = _load(args)
    observed = _observed(args, config)
    sock = None
    if not args.stdio:
        # Refuse a bad bind (no token, port taken) before opening anything, so the error is
        # the only output.
        host = args.host or config.opspawn.server.host
        check_bind(host, Principals.from_config(config))
        sock = bind_http(host, config.opspawn.server.port if args.port is None else args.port)
    for line in server_warnings(config):
        # What `config check` says about mcpServers, said again where a newcomer looks: a file
        # without servers gives agents no tools (the example server is the no-file default).
        logging.getLogger(__name__).warning("%s", line.removeprefix("warning: "))
    try:
        with observed:
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
    from opspawn_mcp.runtime import Runtime

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

    config = _load(args)
    with _observed(args, config):
        return run_worker_process(config)


def cmd_client(args: argparse.Namespace) -> int:
    """submit, status, tasks, cancel, approve, servers: clients of a running server (``commands``)."""
    from opspawn_mcp.commands import run

    return run(args, _load(args))


def _port(text: str) -> int:
    """``--port``: a TCP port number, refused by argparse (usage line, code 2) otherwise."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0 picks a free one)")
    return int(text)


def _log_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="stderr log lines as text or JSON, with the task id (overrides opspawn.telemetry.log_format)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The commands. ``--config`` is accepted before or after a command (``common``: a
    subcommand's copy defaults to SUPPRESS, so it never overwrites one given before it)."""
    parser = argparse.ArgumentParser(
        prog="opspawn-mcp",
        description="MCP-native orchestration server for LLM agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="config file (JSON)")
    parser.add_argument("--version", action="version", version=f"opspawn-mcp {version('opspawn')}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="config file (JSON)")
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument(
        "--url", help="the server's MCP URL (default $OPSPAWN_URL, else http://127.0.0.1:8765/mcp)"
    )
    client.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str, *, parent: argparse.ArgumentParser = client) -> Any:
        return sub.add_parser(
            name,
            help=help,
            description=description,
            parents=[parent],
            epilog=FOLLOW_EPILOG if parent is client else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    serve = command(
        "serve",
        "run the MCP server (stdio, SSE, streamable HTTP) with the embedded worker",
        "Run opspawn as an MCP server. Without --stdio it serves streamable HTTP at /mcp, SSE at "
        "/sse and REST at /v1 on opspawn.server.host:port (127.0.0.1:8765 by default); gRPC only "
        "when opspawn.server.grpc_port (OPSPAWN_SERVER_GRPC_PORT) is set.",
        parent=common,
    )
    serve.add_argument("--stdio", action="store_true", help="speak MCP over stdin/stdout (logs go to stderr)")
    serve.add_argument("--host", help="bind address (overrides opspawn.server.host)")
    serve.add_argument("--port", type=_port, help="port (overrides opspawn.server.port)")
    _log_format_option(serve)
    serve.set_defaults(func=cmd_serve)

    worker = command(
        "worker",
        "run a worker process that executes agent tasks from RabbitMQ",
        "Consume execute_agent_task_actor messages from opspawn.broker_url (amqp://...). "
        "The embedded broker needs no separate worker: serve runs one in-process.",
        parent=common,
    )
    _log_format_option(worker)
    worker.set_defaults(func=cmd_worker)

    submit = command("submit", "submit a task to a running server", "Submit a task and show it.")
    submit.add_argument("goal", help="what the agent must do")
    submit.add_argument(
        "--server", action="append", dest="servers", help="allowed downstream server (repeatable)"
    )
    submit.add_argument("--max-steps", type=int, help="step budget (LLM calls); default 10")
    submit.add_argument("--timeout", type=float, help="seconds the task may run; default 300")
    submit.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the result")
    submit.add_argument("--follow", action="store_true", help="show its steps live until it ends")
    submit.set_defaults(func=cmd_client)

    status = command("status", "show a task", "Show a task's status, steps, tokens, and result or error.")
    status.add_argument("task_id")
    status.add_argument(
        "--follow", "-f", action="store_true", help="show its steps, tool calls and tokens live until it ends"
    )
    status.set_defaults(func=cmd_client)

    tasks = command(
        "tasks",
        "list tasks",
        "List tasks newest first: id, status, goal, age, steps, tokens. With TEXT, only those whose "
        "goal or id contains it (among the newest 2,000).",
    )
    tasks.add_argument("text", nargs="?", help="only tasks whose goal or id contains this (any case)")
    tasks.add_argument("--status", choices=[s.value for s in TaskStatus], help="only tasks in this status")
    tasks.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    tasks.set_defaults(func=cmd_client)

    cancel = command(
        "cancel", "cancel a task", "Cancel a queued, running or input_required task and show it."
    )
    cancel.add_argument("task_id")
    cancel.set_defaults(func=cmd_client)

    approve = command(
        "approve",
        "approve (or --deny) the tool call a task waits on",
        "Answer the approval request of an input_required task (`status ID` shows it); the task goes on.",
    )
    approve.add_argument("task_id")
    approve.add_argument("--request", required=True, metavar="R", help="the request's id (approval.id)")
    approve.add_argument("--deny", action="store_true", help="deny the call instead of approving it")
    approve.add_argument("--note", help="why; the agent reads it with a denial")
    approve.set_defaults(func=cmd_client)

    servers = command(
        "servers",
        "list the downstream MCP servers",
        "List the configured downstream MCP servers with their state and tools.",
    )
    servers.set_defaults(func=cmd_client)

    config = command("config", "check or show the config", "Config file tools.", parent=common)
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate a config file",
        description="Validate FILE (or the file opspawn would use) and print every problem with its JSON path.",
        parents=[common],
    )
    check.add_argument("file", nargs="?", help="config file to check")
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser(
        "show", help="print the effective config (defaults and env overrides applied)", parents=[common]
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
        print(f"opspawn-mcp: {exc.message_for(Door.CLI)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
