"""Submit limits per principal: tasks in flight (counted in the store) and a token bucket.

``TaskService.submit`` checks both before a task is persisted, under one lock per principal.
See docs/configuration.md, "Limits".
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from opspawn_mcp.errors import RateLimited
from opspawn_mcp.principals import Principal
from opspawn_mcp.store.base import TaskStore

IN_FLIGHT_RETRY_S = 5.0
"""How long to suggest waiting when the caller has too many tasks in flight: a task's end
cannot be predicted, so this is a polite polling interval, not a promise."""


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate_per_s``; ``take`` spends one or says how long to wait."""

    capacity: float
    rate_per_s: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Spend a token and return 0, or return the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s


class SubmitGate:
    """Admits a principal's submit, or raises ``RateLimited`` with a ``Retry-After``."""

    def __init__(self, store: TaskStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._buckets: dict[str, TokenBucket] = {}

    @asynccontextmanager
    async def admit(self, by: Principal) -> AsyncIterator[None]:
        """Hold the caller's lock while the body persists the task, so the count stays true."""
        limits = by.limits
        if limits.max_in_flight is None and limits.submits_per_minute is None:
            yield
            return
        lock = self._locks.setdefault(by.name, asyncio.Lock())
        async with lock:
            if limits.max_in_flight is not None:
                active = await self._store.count_active(by.name)
                if active >= limits.max_in_flight:
                    raise RateLimited(
                        f"You have {active} unfinished tasks (queued, running or waiting for approval); your limit is {limits.max_in_flight}. "
                        "Wait for one to finish or cancel one.",
                        retry_after_s=IN_FLIGHT_RETRY_S,
                        limit="max_in_flight",
                    )
            if limits.submits_per_minute is not None:
                wait_s = self._bucket(by).take(self._clock())
                if wait_s > 0:
                    raise RateLimited(
                        f"You are submitting faster than your limit of {limits.submits_per_minute:g} tasks "
                        "per minute.",
                        retry_after_s=wait_s,
                        limit="submits_per_minute",
                    )
            yield

    def _bucket(self, by: Principal) -> TokenBucket:
        bucket = self._buckets.get(by.name)
        if bucket is None:
            rate = by.limits.submits_per_minute or 0.0
            capacity = float(by.limits.submit_burst or max(1, math.floor(rate)))
            bucket = TokenBucket(capacity, rate / 60.0, capacity, self._clock())
            self._buckets[by.name] = bucket
        return bucket
