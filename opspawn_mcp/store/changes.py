"""Writers wake watchers: the in-process half of "events wake watchers" (``ChangeHub``).

See docs/architecture.md, "Events wake watchers".
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Final

LATEST_CAPACITY: Final = 10_000


class ChangeHub:
    """Per-task wakeups for one store on one event loop."""

    def __init__(self, latest_capacity: int = LATEST_CAPACITY) -> None:
        self._waiters: dict[str, dict[asyncio.Future[bool], int]] = {}
        self._latest: OrderedDict[str, int] = OrderedDict()
        self._capacity = latest_capacity
        self.woken = 0
        """How many waits ended because of a write (not a timeout): a figure for tests and probes."""

    @property
    def waiting(self) -> int:
        """How many waits are parked right now."""
        return sum(len(w) for w in self._waiters.values())

    def watched(self) -> dict[str, int]:
        """Each task someone waits on, with the lowest seq they have seen: what a poller asks about."""
        return {task_id: min(w.values()) for task_id, w in self._waiters.items() if w}

    def latest(self, task_id: str) -> int:
        """The newest seq notified for ``task_id`` (0 when unknown or forgotten)."""
        return self._latest.get(task_id, 0)

    def notify(self, task_id: str, seq: int) -> None:
        """Event ``seq`` of ``task_id`` is committed: wake its waiters that are behind it.

        Stale or duplicate notifications (the writer's own one plus the one echoed back by
        ``LISTEN``, or a poll that finds nothing new) wake nobody.
        """
        if seq > self._latest.get(task_id, 0):
            self._latest[task_id] = seq
            self._latest.move_to_end(task_id)
            while len(self._latest) > self._capacity:
                self._latest.popitem(last=False)
        waiters = self._waiters.get(task_id)
        if not waiters:
            return
        for future, seen in list(waiters.items()):
            if seen < seq and not future.done():
                future.set_result(True)
                self.woken += 1

    def wake_all(self) -> None:
        """Every waiter should look again now (the store is closing): a change *may* have happened."""
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_result(True)
                    self.woken += 1

    async def wait(self, task_id: str, seq: int, timeout_s: float) -> bool:
        """Return True once ``task_id`` has (or may have) an event after ``seq``, False when
        ``timeout_s`` passed first. Returns at once if a newer seq was already notified."""
        if self._latest.get(task_id, 0) > seq:
            return True
        if timeout_s <= 0:
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, {})
        waiters[future] = seq
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return False
        finally:
            waiters.pop(future, None)
            if not waiters and self._waiters.get(task_id) is waiters:
                del self._waiters[task_id]
