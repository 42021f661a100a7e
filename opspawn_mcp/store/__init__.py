"""The Metadata Store: pick an implementation from the configured URL.

``open_store`` is the one place that maps a URL to a store, so the config, the CLI and the
tests accept exactly the same URLs. The SQL store is imported lazily: a ``memory://`` unit
test does not need SQLAlchemy's engine machinery.
"""

from __future__ import annotations

from opspawn_mcp.config import StoreSettings, redact_url
from opspawn_mcp.errors import InvalidInput
from opspawn_mcp.store.base import JournalRow, KeyTaken, TaskStore
from opspawn_mcp.store.memory import MemoryStore

__all__ = ["JournalRow", "KeyTaken", "MemoryStore", "TaskStore", "open_store", "pool_size_for"]

# The pool a process gets when it does not say how much work it runs (serve, the CLI).
DEFAULT_CONCURRENCY = 8
# Connections beyond the worker's slots: heartbeats, recovery, watchers.
POOL_HEADROOM = 4
# Each task holds a connection for one short transaction only, so beyond this a bigger pool
# buys nothing but PostgreSQL connections (100 by default, shared by every process).
POOL_CAP = 32

ACCEPTED_URLS = (
    "memory:// (nothing is kept), "
    "sqlite+aiosqlite:///path/to/opspawn.db (one machine), or "
    "postgresql+asyncpg://user@host:5432/db[?schema=name] (shared by many workers)"
)


def pool_size_for(settings: StoreSettings | None, concurrency: int | None) -> int:
    """``opspawn.store.pool_size`` if set, else the worker's concurrency plus headroom, capped."""
    if settings is not None and settings.pool_size is not None:
        return settings.pool_size
    return min((concurrency or DEFAULT_CONCURRENCY) + POOL_HEADROOM, POOL_CAP)


def open_store(
    url: str,
    *,
    schema: str | None = None,
    settings: StoreSettings | None = None,
    concurrency: int | None = None,
) -> TaskStore:
    """Build (not start) the store for ``url``; call ``await store.start()`` before use.

    ``schema`` picks a PostgreSQL schema (same as ``?schema=`` in the URL); it is refused
    for other backends rather than silently ignored. ``settings`` (``opspawn.store``) and
    ``concurrency`` (``opspawn.worker.concurrency``) size the SQL store's connection pool,
    so one engine per process serves all its tasks; both are optional.
    """
    if url.strip() in ("memory://", "memory:", "memory"):
        if schema is not None:
            raise InvalidInput("A schema only applies to a postgresql+asyncpg:// store URL.")
        return MemoryStore()
    if url.startswith(("sqlite+aiosqlite:", "postgresql+asyncpg:")):
        from opspawn_mcp.store.sql import SqlStore

        settings = settings or StoreSettings()
        return SqlStore(
            url,
            schema=schema,
            pool_size=pool_size_for(settings, concurrency),
            pool_timeout_s=settings.pool_timeout_s,
            pool_recycle_s=settings.pool_recycle_s,
        )
    raise InvalidInput(f"Unsupported store URL {redact_url(url)!r}; use {ACCEPTED_URLS}.")
