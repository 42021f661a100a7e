"""What the CLI prints: tables and a live follow view with ``rich`` on a terminal, plain aligned
text otherwise (pipes, files, ``grep``), and the server's JSON as is with ``--json``.

Everything here renders data it is given (task views as the MCP tools return them, events as the
store wrote them); it never talks to a server.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from opspawn_mcp.models import TaskEvent, TaskStatus

GOAL_COLUMN_CHARS = 48
DETAIL_CHARS = 120
FOLLOW_ROWS = 15
"""Events the live view keeps on screen (the plain view prints every one)."""
STYLES = {
    TaskStatus.QUEUED: "yellow",
    TaskStatus.RUNNING: "cyan",
    TaskStatus.COMPLETED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.CANCELLED: "magenta",
    TaskStatus.INPUT_REQUIRED: "bold yellow",
}


def _one_line(text: str | None, limit: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def age(created_at: str, now: datetime | None = None) -> str:
    """``created_at`` (ISO 8601) as a short age: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(((now or datetime.now(UTC)) - datetime.fromisoformat(created_at)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Output:
    """One command's output: JSON (``--json``), rich (stdout is a terminal) or plain text."""

    def __init__(self, *, as_json: bool, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=True)
        self.rich = self.console.is_terminal and not as_json

    def json(self, data: Any) -> None:
        self.console.file.write(json.dumps(data, indent=2) + "\n")

    def record(self, data: Any) -> None:
        """One JSON object on one line (a followed task's events, then the task)."""
        self.console.file.write(json.dumps(data, separators=(",", ":")) + "\n")
        self.console.file.flush()

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> None:
        if self.rich:
            table = Table(*headers, header_style="bold", box=None, pad_edge=False)
            for row in rows:
                table.add_row(*row)
            self.console.print(table)
            return
        cells = [list(headers), *([str(c) for c in row] for row in rows)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        for row in cells:
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            self.console.file.write(line.rstrip() + "\n")

    def fields(self, pairs: Sequence[tuple[str, str | Text]]) -> None:
        if self.rich:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold")
            grid.add_column()
            for key, value in pairs:
                grid.add_row(key, value)
            self.console.print(grid)
            return
        width = max(len(key) for key, _ in pairs)
        for key, value in pairs:
            self.console.file.write(f"{key.ljust(width)}  {value}\n")

    def line(self, text: str | Text) -> None:
        if self.rich:
            self.console.print(text)
        else:
            self.console.file.write(f"{text}\n")


def status_text(status: str) -> Text:
    """A status, coloured; ``completed (warning)`` (a task with a ``warning``) in yellow."""
    name, _, note = status.partition(" ")
    style = "yellow" if note else STYLES.get(TaskStatus(name), "")
    return Text(status, style=style)


def show_tasks(out: Output, page: dict[str, Any]) -> None:
    """The ``tasks`` table: id, status, goal, age, steps, tokens."""
    if out.as_json:
        out.json(page)
        return
    tasks = page["tasks"]
    if not tasks:
        out.line("no tasks (submit one with `opspawn-mcp submit GOAL`)")
        return
    rows = [
        [
            t["task_id"],
            status_text(t["status"] + (" (warning)" if t.get("warning") else "")),
            _one_line(t["goal"], GOAL_COLUMN_CHARS),
            age(t["created_at"]),
            str(t["progress"]["steps"]),
            str(t["usage"]["total_tokens"]),
        ]
        for t in tasks
    ]
    out.table(["ID", "STATUS", "GOAL", "AGE", "STEPS", "TOKENS"], rows)
    if page.get("next_cursor"):
        out.line(f"(more: --cursor {page['next_cursor']})")


def show_task(out: Output, view: dict[str, Any]) -> None:
    """One task, field by field; ``result``, ``error`` and ``warning`` only when set."""
    if out.as_json:
        out.json(view)
        return
    usage = view["usage"]
    pairs: list[tuple[str, str | Text]] = [
        ("task", view["task_id"]),
        ("status", status_text(view["status"])),
        ("goal", _one_line(view["goal"], DETAIL_CHARS)),
        ("steps", f"{view['progress']['steps']}/{view['progress']['max_steps']}"),
        (
            "tokens",
            f"{usage['total_tokens']} (in {usage['input_tokens']}, out {usage['output_tokens']})",
        ),
        ("age", age(view["created_at"])),
    ]
    for key in ("result", "error", "warning"):
        if view.get(key):
            style = {"error": "red", "warning": "yellow"}.get(key, "")
            pairs.append((key, Text(view[key], style=style)))
    request = view.get("approval")
    if request:
        pairs.append(("waits for", _one_line(request["message"], DETAIL_CHARS)))
        pairs.append(("answer", f"opspawn-mcp approve {view['task_id']} --request {request['id']} [--deny]"))
    elif not view["done"]:
        pairs.append(("next", view["next"]))
    out.fields(pairs)


def show_servers(out: Output, answer: dict[str, Any]) -> None:
    if out.as_json:
        out.json(answer)
        return
    rows = [
        [
            s["name"],
            s["state"],
            ", ".join(s.get("tools") or []) or "-",
            ", ".join(f"{h['name']} ({h['reason']})" for h in s.get("hidden") or []) or "-",
            _one_line(s.get("last_error"), 60),
        ]
        for s in answer["servers"]
    ]
    out.table(["SERVER", "STATE", "TOOLS", "HIDDEN", "ERROR"], rows)


def describe_event(event: TaskEvent) -> tuple[str, str] | None:
    """An event as (what, detail) for the follow view; None for events not worth a line."""
    data = event.data
    if event.kind == "llm":
        usage = data.get("usage") or {}
        calls = ", ".join(c.get("name", "?") for c in data.get("tool_calls") or [])
        said = f"calls {calls}" if calls else _one_line(data.get("content"), DETAIL_CHARS)
        return "llm", f"+{usage.get('total_tokens', 0)} tokens: {said}"
    if event.kind == "tool_call":
        arguments = json.dumps(data.get("arguments"), separators=(",", ":"))
        return "tool_call", _one_line(f"{data.get('name')} {arguments}", DETAIL_CHARS)
    if event.kind == "tool_result":
        mark = " (error)" if data.get("is_error") else ""
        return "tool_result", _one_line(f"{data.get('name')}{mark}: {data.get('content')}", DETAIL_CHARS)
    if event.kind == "progress":
        return "progress", _one_line(f"{data.get('tool')}: {data.get('message') or data.get('progress')}", 80)
    if event.kind == "input_required":
        answer = f"opspawn-mcp approve {event.task_id} --request {data.get('id')} [--deny]"
        return "approval", f"{_one_line(data.get('message'), DETAIL_CHARS)} Answer: {answer}"
    if event.kind == "state":
        why = data.get("reason")
        return "state", f"{data.get('status')}" + (f": {_one_line(why, DETAIL_CHARS)}" if why else "")
    return None


async def follow(out: Output, events: AsyncIterator[TaskEvent]) -> None:
    """Show ``events`` as they come until the stream ends: a line per event in plain text (and
    for ``--json``, one JSON object per line), a live table with a running total on a terminal."""
    if not out.rich:
        async for event in events:
            if out.as_json:
                out.record(event.model_dump(mode="json"))
            elif (described := describe_event(event)) is not None:
                out.line(f"step {event.data.get('step', '-')}  {described[0]:<11}  {described[1]}")
                out.console.file.flush()
        return
    rows: list[tuple[str, str, str]] = []
    tokens = 0
    status = "queued"

    def view() -> Group:
        table = Table("STEP", "EVENT", "DETAIL", header_style="bold", box=None, pad_edge=False)
        for row in rows[-FOLLOW_ROWS:]:
            table.add_row(*row)
        summary = Text.assemble("status ", status_text(status), f"  ·  {tokens} tokens")
        return Group(table, summary)

    with Live(view(), console=out.console, auto_refresh=False, transient=False) as live:
        async for event in events:
            if event.kind == "llm":
                tokens += int((event.data.get("usage") or {}).get("total_tokens", 0))
            if event.kind == "state":
                status = str(event.data.get("status", status))
            described = describe_event(event)
            if described is not None:
                rows.append((str(event.data.get("step", "-")), *described))
            live.update(view(), refresh=True)
