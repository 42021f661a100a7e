"""The client commands (``submit``, ``status``, ``tasks``, ``cancel``, ``approve``, ``servers``): each is one
or a few calls to a running server through ``Remote``, printed through ``console``.

Exit codes: 0 done; for a followed task (``--follow``), 1 when it failed and 3 when it was
cancelled; 2 for every error (no server, refused, no such task), which is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from opspawn_mcp.config import Config
from opspawn_mcp.console import Output, follow, show_servers, show_task, show_tasks
from opspawn_mcp.remote import RESPONSE_MARGIN_S, Refused, Remote, Unreachable
from opspawn_mcp.service import LIST_PAGE_MAX

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 2, 3
EXIT_BY_STATUS = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
DEFAULT_URL = "http://127.0.0.1:8765/mcp"
TOKEN_ENV = "OPSPAWN_TOKEN"
"""The bearer token (a principal's); else the variable ``auth_token_env`` names."""
TEXT_SCAN_PAGES = 10
"""``tasks TEXT`` looks through the newest ``TEXT_SCAN_PAGES`` full pages (2,000 tasks) at most."""

Command = Callable[[argparse.Namespace, Remote, Output], Coroutine[Any, Any, int]]


def run(args: argparse.Namespace, config: Config) -> int:
    """Run ``args.command`` against the server: ``--url``, else ``$OPSPAWN_URL``, else the
    default; the token from the environment, never the command line (``ps`` would show it)."""
    token_env = config.opspawn.server.auth_token_env
    token = os.environ.get(TOKEN_ENV) or (os.environ.get(token_env) if token_env else None)
    remote = Remote(args.url or os.environ.get("OPSPAWN_URL") or DEFAULT_URL, token)
    try:
        return asyncio.run(COMMANDS[args.command](args, remote, Output(as_json=args.json)))
    except (Refused, Unreachable) as exc:
        print(f"opspawn-mcp: {exc}", file=sys.stderr)
        return EXIT_ERROR


async def submit(args: argparse.Namespace, remote: Remote, out: Output) -> int:
    arguments: dict[str, object] = {"goal": args.goal, "wait": args.wait}
    optional = {"servers": args.servers, "max_steps": args.max_steps, "timeout_s": args.timeout}
    arguments.update({k: v for k, v in optional.items() if v is not None})
    # The server answers only when the wait ends, so the client must wait longer than that.
    view = await remote.call("submit_task", arguments, timeout_s=max(args.wait, 0.0) + RESPONSE_MARGIN_S)
    return await _follow(remote, out, view) if args.follow else _show(out, view)


async def status(args: argparse.Namespace, remote: Remote, out: Output) -> int:
    view = await remote.call("get_status", {"task_id": args.task_id})
    return await _follow(remote, out, view) if args.follow else _show(out, view)


async def cancel(args: argparse.Namespace, remote: Remote, out: Output) -> int:
    return _show(out, await remote.call("cancel_task", {"task_id": args.task_id}))


async def approve(args: argparse.Namespace, remote: Remote, out: Output) -> int:
    answer = {"task_id": args.task_id, "request_id": args.request, "approve": not args.deny}
    if args.note is not None:
        answer["note"] = args.note
    return _show(out, await remote.call("approve_task", answer))


async def tasks(args: argparse.Namespace, remote: Remote, out: Output) -> int:
    """The newest tasks, or (with TEXT) the newest whose goal or id contains TEXT, any case."""
    query: dict[str, object] = {"limit": args.limit}
    if args.status:
        query["status"] = args.status
    if not args.text:
        show_tasks(out, await remote.call("list_tasks", query))
        return EXIT_OK
    needle = args.text.casefold()
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(TEXT_SCAN_PAGES):
        page = await remote.call("list_tasks", {**query, "limit": LIST_PAGE_MAX, "cursor": cursor})
        found += [t for t in page["tasks"] if needle in f"{t['task_id']} {t['goal']}".casefold()]
        cursor = page["next_cursor"]
        if len(found) >= args.limit or cursor is None:
            break
    show_tasks(out, {"tasks": found[: args.limit], "next_cursor": None})
    return EXIT_OK


async def servers(args: argparse.Namespace, remote: Remote, out: Output) -> int:
    show_servers(out, await remote.call("list_servers", {}))
    return EXIT_OK


def _show(out: Output, view: dict[str, Any]) -> int:
    show_task(out, view)
    return EXIT_OK


async def _follow(remote: Remote, out: Output, view: dict[str, Any]) -> int:
    """Show the task's events (those so far, then each as it comes) until it ends, then the
    task; the exit code is its status's."""
    await follow(out, remote.events(view["task_id"]))
    view = await remote.call("get_status", {"task_id": view["task_id"]})
    if out.as_json:
        out.record(view)  # the last of the JSON lines the events were
    else:
        show_task(out, view)
    return EXIT_BY_STATUS.get(view["status"], EXIT_ERROR)


COMMANDS: dict[str, Command] = {
    "submit": submit,
    "status": status,
    "cancel": cancel,
    "approve": approve,
    "tasks": tasks,
    "servers": servers,
}
