"""The SQL store's schema: the tables, the column types every dialect reads back alike, and the
numbered, append-only migrations ``SqlStore.start`` applies.

See docs/architecture.md, "The SQL store".
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

from opspawn_mcp.config import DEFAULT_PROFILE, LOCAL_PRINCIPAL
from opspawn_mcp.errors import Unavailable
from opspawn_mcp.models import (
    utcnow,
)
from opspawn_mcp.store._common import (
    as_utc,
)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out on every dialect (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


_Json = JSON().with_variant(JSONB(), "postgresql")
# A nullable JSON column: Python None is SQL NULL, not the JSON value null.
_NullableJson = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    Column("id", String, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("spec", _Json, nullable=False),
    Column("result", Text),
    Column("error", Text),
    Column("usage", _Json, nullable=False),
    Column("steps", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("lease_owner", String),
    Column("lease_expires_at", UtcDateTime),
    Column("principal", String, nullable=False, server_default=LOCAL_PRINCIPAL),
    # The seq of the task's newest event: appends bump it under the row lock (migration 3).
    Column("last_seq", Integer, nullable=False, default=0, server_default="0"),
    # When the broker confirmed the task's message; NULL while none is (migration 4): the outbox.
    Column("enqueued_at", UtcDateTime),
    # The request an input_required task waits on, and when it times out (migration 5).
    Column("approval", _NullableJson),
    Column("approval_expires_at", UtcDateTime),
    # Why a completed task's answer needs checking (migration 6): Task.warning.
    Column("warning", Text),
    # The submitter's idempotency key, unique per principal (migration 8): Task.idempotency_key.
    Column("idempotency_key", String),
    # list(status=...) newest first, list() newest first, and the recovery loop's scan.
    Index("ix_tasks_status_created", "status", "created_at", "id"),
    Index("ix_tasks_created", "created_at", "id"),
    Index("ix_tasks_status_lease", "status", "lease_expires_at"),
    Index("ix_tasks_status_approval", "status", "approval_expires_at"),
    # One principal's tasks newest first, and its tasks in flight.
    Index("ix_tasks_principal_created", "principal", "created_at", "id"),
    Index("ix_tasks_principal_status", "principal", "status"),
    # A repeated submit with the same key finds its task; a second insert of the key fails.
    Index("ux_tasks_principal_key", "principal", "idempotency_key", unique=True),
)

task_events = Table(
    "task_events",
    metadata,
    Column("task_id", String, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("time", UtcDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("data", _Json, nullable=False),
    PrimaryKeyConstraint("task_id", "seq", name="pk_task_events"),
)

task_journal = Table(
    "task_journal",
    metadata,
    Column("task_id", String, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ordinal", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("data", _Json, nullable=False),
    Column("time", UtcDateTime, nullable=False),
    # Written once: a second insert of one key is a replay bug, refused as Conflict.
    PrimaryKeyConstraint("task_id", "kind", "ordinal", name="pk_task_journal"),
)

exposed_calls = Table(
    "exposed_calls",
    metadata,
    Column("id", String, primary_key=True),
    Column("at", UtcDateTime, nullable=False),
    Column("principal", String, nullable=False),
    Column("server", String, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("name", Text, nullable=False),
    Column("arguments", _Json, nullable=False),
    Column("outcome", String(8), nullable=False),
    Column("error", Text),
    Column("duration_ms", Float, nullable=False),
    # Everyone's newest first (admins), one principal's, one server's.
    Index("ix_exposed_calls_at", "at", "id"),
    Index("ix_exposed_calls_principal_at", "principal", "at", "id"),
    Index("ix_exposed_calls_server_at", "server", "at", "id"),
)

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", UtcDateTime, nullable=False),
)


def _migration_1(conn: Connection) -> None:
    tasks.create(conn, checkfirst=True)
    task_events.create(conn, checkfirst=True)


def _migration_2(conn: Connection) -> None:
    """Tasks belong to principals, and models are chosen by profile name.

    On a database migration 1 has just created, the table already has the new shape. On an
    older one: add ``principal`` (old tasks were the local user's), its indexes, and rewrite
    specs whose ``model`` still names an endpoint to the default profile with the same knobs.
    """
    columns = {c["name"] for c in inspect(conn).get_columns("tasks")}
    if "principal" not in columns:
        conn.execute(
            text(f"ALTER TABLE tasks ADD COLUMN principal VARCHAR NOT NULL DEFAULT '{LOCAL_PRINCIPAL}'")
        )
        for index in tasks.indexes:
            # Not the indexes of columns a later migration adds (ux_tasks_principal_key: 8).
            if "principal" in index.columns and {c.name for c in index.columns} <= columns | {"principal"}:
                index.create(conn, checkfirst=True)
    for task_id, spec in conn.execute(select(tasks.c.id, tasks.c.spec)).all():
        model = dict(spec.get("model") or {})
        if model.keys() - {"profile", "temperature", "max_tokens"}:
            kept = {k: model[k] for k in ("temperature", "max_tokens") if model.get(k) is not None}
            new_spec = {**spec, "model": {"profile": DEFAULT_PROFILE, **kept}}
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(spec=new_spec))


def _migration_3(conn: Connection) -> None:
    """Event numbers kept on the task row, and the step journal.

    ``last_seq`` replaces ``SELECT max(seq)`` on every append; existing tasks get their current
    maximum, so the next append continues their log without a gap. On a database migration 1
    has just created the column is already there (and every task has no events yet).
    """
    columns = {c["name"] for c in inspect(conn).get_columns("tasks")}
    if "last_seq" not in columns:
        conn.execute(text("ALTER TABLE tasks ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0"))
    newest = select(func.max(task_events.c.seq)).where(task_events.c.task_id == tasks.c.id).scalar_subquery()
    conn.execute(update(tasks).values(last_seq=func.coalesce(newest, 0)))
    task_journal.create(conn, checkfirst=True)


def _migration_4(conn: Connection) -> None:
    """The outbox: ``enqueued_at`` says the broker confirmed a task's message. Tasks that exist
    already had their message published the old way, so they count as enqueued."""
    columns = {c["name"] for c in inspect(conn).get_columns("tasks")}
    if "enqueued_at" not in columns:
        conn.execute(text("ALTER TABLE tasks ADD COLUMN enqueued_at TIMESTAMP WITH TIME ZONE"))
        conn.execute(update(tasks).values(enqueued_at=tasks.c.created_at))


def _migration_5(conn: Connection) -> None:
    """Approvals: the request an ``input_required`` task waits on, and its deadline (indexed for
    the recovery loop's timeout scan). Existing tasks wait on nothing."""
    columns = {c["name"] for c in inspect(conn).get_columns("tasks")}
    if "approval" not in columns:
        json_type = "JSONB" if conn.dialect.name == "postgresql" else "JSON"
        conn.execute(text(f"ALTER TABLE tasks ADD COLUMN approval {json_type}"))
        conn.execute(text("ALTER TABLE tasks ADD COLUMN approval_expires_at TIMESTAMP WITH TIME ZONE"))
    for index in tasks.indexes:
        if "approval_expires_at" in index.columns:
            index.create(conn, checkfirst=True)


def _migration_6(conn: Connection) -> None:
    """``warning``: why a completed task's answer needs checking (no successful tool result, an
    empty answer). Tasks that exist have none: nothing was checked when they completed."""
    columns = {c["name"] for c in inspect(conn).get_columns("tasks")}
    if "warning" not in columns:
        conn.execute(text("ALTER TABLE tasks ADD COLUMN warning TEXT"))


def _migration_7(conn: Connection) -> None:
    """The audit of exposed calls: every tool call, resource read and prompt get an MCP client
    made through ``mcpServers.X.expose``, kept beyond the process (it was in memory only)."""
    exposed_calls.create(conn, checkfirst=True)


def _migration_8(conn: Connection) -> None:
    """``idempotency_key``, unique per principal (NULLs never clash): a repeated submit with the
    same key answers the task it created. Tasks that exist were submitted without one."""
    columns = {c["name"] for c in inspect(conn).get_columns("tasks")}
    if "idempotency_key" not in columns:
        conn.execute(text("ALTER TABLE tasks ADD COLUMN idempotency_key VARCHAR"))
    for index in tasks.indexes:
        if "idempotency_key" in index.columns:
            index.create(conn, checkfirst=True)


# Append only: a released version's step never changes, a new one gets the next number.
MIGRATIONS: Final = (
    (1, "tasks and task_events", _migration_1),
    (2, "task principals; model profiles by name", _migration_2),
    (3, "tasks.last_seq; task_journal", _migration_3),
    (4, "tasks.enqueued_at: the outbox", _migration_4),
    (5, "tasks.approval, tasks.approval_expires_at: pauses for approval", _migration_5),
    (6, "tasks.warning: why a completed answer needs checking", _migration_6),
    (7, "exposed_calls: the audit of calls through exposed servers", _migration_7),
    (8, "tasks.idempotency_key: repeated submits answer one task", _migration_8),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]


def migrate(conn: Connection) -> None:
    """Create the version table if missing, then apply every migration newer than the recorded one."""
    schema_version.create(conn, checkfirst=True)
    current = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
    if current > SCHEMA_VERSION:
        raise Unavailable(
            f"The task database is at schema version {current}, newer than this opspawn "
            f"understands ({SCHEMA_VERSION}); upgrade opspawn or point store_url at another database."
        )
    for version, description, step in MIGRATIONS:
        if version > current:
            step(conn)
            conn.execute(
                insert(schema_version).values(version=version, description=description, applied_at=utcnow())
            )
