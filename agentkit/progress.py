"""Progress of a long tool call, reported while it runs, as throttled ``progress`` agent events.

See docs/agentkit.md, "Progress of long tool calls".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

import anyio


class ProgressCallback(Protocol):
    """What receives progress: the shape of the ``mcp`` SDK's ``progress_callback``."""

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None: ...


class ToolProgress:
    """The progress sink of one tool call; a ``ProgressCallback``.

    ``emit`` receives the event data (``tool``, ``call_id``, ``progress``, ``total``,
    ``message``). Reports are emitted in arrival order, never concurrently; reports that arrive
    after ``finish``/``close`` (a late notification from a call that already returned) are dropped.
    """

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        tool: str,
        call_id: str = "",
        interval_s: float = 0.5,
    ) -> None:
        self._emit = emit
        self.tool = tool
        self.call_id = call_id
        self.interval_s = interval_s
        self._lock = anyio.Lock()
        self._last_emit: float | None = None
        self._pending: dict[str, Any] | None = None
        self._closed = False
        self._attached: dict[str, Any] = {}
        self._last: tuple[float, float | None] = (0, None)

    def _data(self, progress: float, total: float | None, message: str | None) -> dict[str, Any]:
        self._last = (progress, total)
        return {
            "tool": self.tool,
            "call_id": self.call_id,
            "progress": progress,
            "total": total,
            "message": message,
            **self._attached,
        }

    async def attach(self, message: str | None = None, **fields: Any) -> None:
        """Add ``fields`` to every later event of this call, and emit one now, unthrottled.

        For what a host learns during a call and a reader needs at once, e.g. the id of the
        downstream task a call started (``subtask``), so it can be followed or cancelled.
        """
        if self._closed:
            return
        async with self._lock:
            if self._closed:
                return
            self._attached.update(fields)
            self._pending = None
            self._last_emit = anyio.current_time()
            await self._emit(self._data(*self._last, message))

    async def __call__(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        if self._closed:
            return
        async with self._lock:
            if self._closed:
                return
            data = self._data(progress, total, message)
            now = anyio.current_time()
            if self._last_emit is not None and now - self._last_emit < self.interval_s:
                self._pending = data  # the newest one wins; finish() emits it if nothing newer is sent
                return
            self._pending = None
            self._last_emit = now
            await self._emit(data)

    async def finish(self) -> None:
        """The call ended: emit the report the throttle held back, then accept no more."""
        if self._closed:
            return
        async with self._lock:
            self._closed = True
            pending, self._pending = self._pending, None
            if pending is not None:
                await self._emit(pending)

    def close(self) -> None:
        """Accept no more reports, without emitting (the call was cancelled)."""
        self._closed = True


_current: ContextVar[ToolProgress | None] = ContextVar("agentkit_tool_progress", default=None)


def current_progress() -> ToolProgress | None:
    """The progress sink of the tool call running in this context, if an agent runs one."""
    return _current.get()


def set_current_progress(progress: ToolProgress | None) -> Any:
    """Install ``progress`` for the current context; returns the token for ``reset_current_progress``."""
    return _current.set(progress)


def reset_current_progress(token: Any) -> None:
    _current.reset(token)


async def report_progress(progress: float, total: float | None = None, message: str | None = None) -> None:
    """Report progress from inside a tool; does nothing outside an agent's tool call."""
    sink = _current.get()
    if sink is not None:
        await sink(progress, total, message)
