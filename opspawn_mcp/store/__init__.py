"""The Metadata Store: pick an implementation from the configured URL.

``open_store`` is the one place that maps a URL to a store, so the config, the CLI and the
tests accept exactly the same URLs. The SQL store is imported lazily: a ``memory://`` unit
test does not need SQLAlchemy's engine machinery.
"""

from __future__ import annotations

from opspawn_mcp.errors import InvalidInput
from opspawn_mcp.store.base import TaskStore
from opspawn_mcp.store.memory import MemoryStore

__all__ = ["MemoryStore", "TaskStore", "open_store"]

ACCEPTED_URLS = (
    "memory:// (nothing is kept), "
    "sqlite+aiosqlite:///path/to/opspawn.db (one machine), or "
    "postgresql+asyncpg://user@host:5432/db[?schema=name] (shared by many workers)"
)


def open_store(url: str, *, schema: str | None = None) -> TaskStore:
    """Build (not start) the store for ``url``; call ``await store.start()`` before use.

    ``schema`` picks a PostgreSQL schema (same as ``?schema=`` in the URL); it is refused
    for other backends rather than silently ignored.
    """
    if url.strip() in ("memory://", "memory:", "memory"):
        if schema is not None:
            raise InvalidInput("A schema only applies to a postgresql+asyncpg:// store URL.")
        return MemoryStore()
    if url.startswith(("sqlite+aiosqlite:", "postgresql+asyncpg:")):
        from opspawn_mcp.store.sql import SqlStore

        return SqlStore(url, schema=schema)
    raise InvalidInput(f"Unsupported store URL {_redact(url)!r}; use {ACCEPTED_URLS}.")


def _redact(url: str) -> str:
    """Hide a password in an echoed URL, so a typo'd URL does not leak it into logs."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        return f"{scheme}://{creds}@{host}"
    return url
