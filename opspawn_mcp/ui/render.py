"""The dashboard's HTML: one Jinja environment over the package's templates, and its filters.

Pages and the fragments the script swaps in (task rows, a task's summary, one timeline event)
come from the same templates, so a live update looks exactly like a reload. Autoescaping is
on for everything: goals, tool arguments and results are untrusted text.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import ChainableUndefined, Environment, PackageLoader

from opspawn_mcp.models import TaskEvent, TaskStatus, utcnow

CLIP_CHARS = 4000
"""How much of a long text (a tool result, a model reply) a timeline row shows."""
STATIC_PREFIX = "/ui/static/"


def _clip(text: Any, limit: int = CLIP_CHARS) -> str:
    value = "" if text is None else str(text)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… ({len(value) - limit} more characters)"


def _pretty(value: Any) -> str:
    return _clip(json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True))


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours < 48 else f"{hours // 24} days"


def _between(start: datetime | None, end: datetime | None) -> str:
    """The time from ``start`` to ``end`` (now if None), or an empty string with no start."""
    if start is None:
        return ""
    return _seconds(max(0.0, ((end or utcnow()) - start).total_seconds()))


def _stamp(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


class Durations:
    """How long each step of the timeline took, fed the task's events in order: a tool result
    since its call, a model reply since the event before it (the model's own time)."""

    def __init__(self) -> None:
        self._last: datetime | None = None
        self._calls: dict[str, datetime] = {}

    def took(self, event: TaskEvent) -> str:
        """The row's duration, or an empty string where none applies."""
        start: datetime | None = None
        if event.kind == "tool_call":
            self._calls[str(event.data.get("id"))] = event.time
        elif event.kind == "tool_result":
            start = self._calls.pop(str(event.data.get("call_id")), None)
        elif event.kind == "llm":
            start = self._last
        self._last = event.time
        return _between(start, event.time)


def build_environment() -> Environment:
    env = Environment(
        loader=PackageLoader("opspawn_mcp.ui", "templates"),
        autoescape=True,
        undefined=ChainableUndefined,  # events are JSON of several shapes: a missing field shows nothing
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(clip=_clip, pretty=_pretty, stamp=_stamp)
    env.globals.update(
        between=_between,
        statuses=[s.value for s in TaskStatus],
        static=lambda name: STATIC_PREFIX + name,
    )
    return env
