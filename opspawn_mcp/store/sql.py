"""The SQL store: SQLite (one machine) or PostgreSQL (many workers) through SQLAlchemy async Core.

Every state change is a single guarded ``UPDATE ... WHERE id = ? AND status IN (...)`` whose
returned row says whether it won; the database arbitrates races, never a read in Python
followed by a write. Only when the guard did not match do we read the row, to tell the
caller *why* (``TaskNotFound`` vs ``IllegalTransition``).

SQLite notes: writers use ``BEGIN IMMEDIATE`` so two writers queue on the busy timeout
instead of failing with "database is locked" half-way through a read-then-insert (the
event ``seq``), and the file runs in WAL mode so readers do not block the writer.
SQLite stores naive datetimes; ``UtcDateTime`` writes UTC and reads it back as aware UTC.

PostgreSQL notes: a ``schema`` (``?schema=name`` or the keyword) is put on every
connection's ``search_path``, so one server can host several isolated stores (tests use
one per run). Schema creation and migrations run under an advisory lock, so twenty
workers starting at once migrate exactly once.
"""

from __future__ import annotations

import builtins
import re
import zlib
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Row,
    String,
    Table,
    Text,
    and_,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator

from opspawn_mcp.config import DEFAULT_PROFILE, LOCAL_PRINCIPAL
from opspawn_mcp.errors import Conflict, IllegalTransition, InvalidInput, TaskNotFound, Unavailable
from opspawn_mcp.models import Task, TaskEvent, TaskPage, TaskSpec, TaskStatus, Usage, utcnow
from opspawn_mcp.store._common import (
    allowed_from,
    as_utc,
    check_kind,
    check_limit,
    check_log_open,
    decode_cursor,
    encode_cursor,
    lease_until,
    state_event,
    transition_values,
)

SQLITE_BUSY_TIMEOUT_S: Final = 30.0
PG_CONNECT_TIMEOUT_S: Final = 10.0
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


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
    # list(status=...) newest first, list() newest first, and the recovery loop's scan.
    Index("ix_tasks_status_created", "status", "created_at", "id"),
    Index("ix_tasks_created", "created_at", "id"),
    Index("ix_tasks_status_lease", "status", "lease_expires_at"),
    # One principal's tasks newest first, and its tasks in flight.
    Index("ix_tasks_principal_created", "principal", "created_at", "id"),
    Index("ix_tasks_principal_status", "principal", "status"),
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
            if "principal" in index.columns:
                index.create(conn, checkfirst=True)
    for task_id, spec in conn.execute(select(tasks.c.id, tasks.c.spec)).all():
        model = dict(spec.get("model") or {})
        if model.keys() - {"profile", "temperature", "max_tokens"}:
            kept = {k: model[k] for k in ("temperature", "max_tokens") if model.get(k) is not None}
            new_spec = {**spec, "model": {"profile": DEFAULT_PROFILE, **kept}}
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(spec=new_spec))


# Append only: a released version's step never changes, a new one gets the next number.
MIGRATIONS: Final = (
    (1, "tasks and task_events", _migration_1),
    (2, "task principals; model profiles by name", _migration_2),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]


def _migrate(conn: Connection) -> None:
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


def _to_task(row: Row[Any]) -> Task:
    m = row._mapping
    return Task(
        id=m["id"],
        spec=TaskSpec.model_validate(m["spec"]),
        status=TaskStatus(m["status"]),
        result=m["result"],
        error=m["error"],
        usage=Usage.model_validate(m["usage"] or {}),
        steps=m["steps"],
        attempts=m["attempts"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        principal=m["principal"],
    )


def _to_event(row: Row[Any]) -> TaskEvent:
    m = row._mapping
    return TaskEvent(task_id=m["task_id"], seq=m["seq"], time=m["time"], kind=m["kind"], data=m["data"])


async def _insert_event(conn: AsyncConnection, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:
    """Append with seq = max + 1, inside a transaction that holds the task's row lock."""
    last = (
        await conn.execute(
            select(func.coalesce(func.max(task_events.c.seq), 0)).where(task_events.c.task_id == task_id)
        )
    ).scalar_one()
    row = (
        await conn.execute(
            insert(task_events)
            .values(task_id=task_id, seq=int(last) + 1, time=utcnow(), kind=kind, data=data)
            .returning(*task_events.c)
        )
    ).one()
    return _to_event(row)


class SqlStore:
    """``TaskStore`` on ``sqlite+aiosqlite:///path`` or ``postgresql+asyncpg://...``.

    Build it cheaply, then ``await start()`` to connect and migrate; ``close()`` disposes
    the connection pool. ``schema`` (PostgreSQL only) may also come as ``?schema=`` in the URL.
    """

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise InvalidInput(f"Cannot parse the store URL: {exc}.") from exc
        query_schema = parsed.query.get("schema")
        if isinstance(query_schema, tuple):
            raise InvalidInput("Give ?schema= at most once in the store URL.")
        if query_schema is not None and schema is not None and query_schema != schema:
            raise InvalidInput(
                f"The store URL says schema {query_schema!r} but schema={schema!r} was passed."
            )
        schema = schema if schema is not None else query_schema
        parsed = parsed.difference_update_query(["schema"])
        backend = parsed.get_backend_name()
        if parsed.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
            raise InvalidInput(
                f"Unsupported store driver {parsed.drivername!r}; use sqlite+aiosqlite:///path or "
                "postgresql+asyncpg://user@host/db."
            )
        if schema is not None:
            if backend != "postgresql":
                raise InvalidInput("A schema only applies to a postgresql+asyncpg:// store URL.")
            if not _SCHEMA_NAME.match(schema):
                raise InvalidInput(
                    f"Schema name {schema!r} is not a plain identifier (letters, digits, _; max 63)."
                )
        if backend == "sqlite":
            database = parsed.database or ""
            if database in ("", ":memory:") or database.startswith("file:"):
                raise InvalidInput(
                    "An in-memory SQLite store is not supported; use memory:// for a throwaway "
                    "store or sqlite+aiosqlite:///path/to/opspawn.db for a file."
                )
            parsed = parsed.set(database=str(Path(database).expanduser()))
        self._url: URL = parsed
        self._schema = schema
        self._sqlite = backend == "sqlite"
        self._engine: AsyncEngine | None = None

    @property
    def schema(self) -> str | None:
        return self._schema

    def _where(self) -> str:
        """The database, password hidden, for messages."""
        where = self._url.render_as_string(hide_password=True)
        return f"{where} (schema {self._schema})" if self._schema else where

    def _make_engine(self) -> AsyncEngine:
        if self._sqlite:
            assert self._url.database is not None
            folder = Path(self._url.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise Unavailable(
                    f"Cannot create the folder {str(folder)!r} for the task database: {exc.strerror or exc}. "
                    "Point store_url at a writable path."
                ) from exc
            engine = create_async_engine(self._url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            sync_engine = engine.sync_engine

            @event.listens_for(sync_engine, "connect")
            def _on_connect(dbapi_connection: Any, _record: Any) -> None:
                # Hand transaction control to the "begin" hook below (the driver's own
                # implicit BEGIN is DEFERRED, which upgrades to a write lock too late).
                dbapi_connection.isolation_level = None
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()

            @event.listens_for(sync_engine, "begin")
            def _on_begin(conn: Connection) -> None:
                mode = conn.get_execution_options().get("opspawn_begin", "DEFERRED")
                conn.exec_driver_sql(f"BEGIN {mode}")

            return engine
        connect_args: dict[str, Any] = {"timeout": PG_CONNECT_TIMEOUT_S}
        if self._schema:
            connect_args["server_settings"] = {"search_path": self._schema}
        return create_async_engine(self._url, connect_args=connect_args, pool_pre_ping=True)

    @asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[AsyncConnection]:
        """One transaction; a lost or unreachable database becomes ``Unavailable``."""
        if self._engine is None:
            raise Unavailable("The task store is not started; call start() first.")
        try:
            async with self._engine.connect() as conn:
                if write and self._sqlite:
                    await conn.execution_options(opspawn_begin="IMMEDIATE")
                async with conn.begin():
                    yield conn
        except DBAPIError as exc:
            if _bad_value(exc):
                raise InvalidInput(
                    f"The database refused a value of this request: {_first_line(exc)}. "
                    "Remove control characters (NUL) and keep numbers within range."
                ) from exc
            if not _unreachable(exc):
                raise  # a bug in a statement, not an outage: let it show as one
            raise Unavailable(
                f"The task database {self._where()} cannot be reached or is busy: {_first_line(exc)}. "
                "Check that it is running and store_url is right, then retry."
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise Unavailable(
                f"The task database {self._where()} cannot be reached or is busy: {_first_line(exc)}. "
                "Check that it is running and store_url is right, then retry."
            ) from exc

    async def start(self) -> None:
        if self._engine is None:
            self._engine = self._make_engine()
        async with self._tx() as conn:
            if not self._sqlite:
                # One migrator per database+schema at a time; others wait, then find nothing to do.
                key = zlib.crc32(f"opspawn-store:{self._schema or ''}".encode())
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
                if self._schema:
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"'))
            await conn.run_sync(_migrate)

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def ping(self) -> None:
        async with self._tx(write=False) as conn:
            await conn.execute(text("SELECT 1"))

    async def schema_version(self) -> int:
        """The version recorded in ``schema_version`` (0 if the table is empty)."""
        async with self._tx(write=False) as conn:
            return int((await conn.execute(select(func.max(schema_version.c.version)))).scalar() or 0)

    async def create(self, task: Task) -> Task:
        values = {
            "id": task.id,
            "status": task.status.value,
            "spec": task.spec.model_dump(mode="json"),
            "result": task.result,
            "error": task.error,
            "usage": task.usage.model_dump(mode="json"),
            "steps": task.steps,
            "attempts": task.attempts,
            "created_at": task.created_at,
            "started_at": task.started_at,
            "finished_at": task.finished_at,
            "lease_owner": task.lease_owner,
            "lease_expires_at": task.lease_expires_at,
            "principal": task.principal,
        }
        try:
            async with self._tx() as conn:
                row = (await conn.execute(insert(tasks).values(**values).returning(*tasks.c))).one()
        except IntegrityError as exc:
            raise Conflict(f"A task with id {task.id!r} already exists; create it with a new id.") from exc
        return _to_task(row)

    async def get(self, task_id: str) -> Task:
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).first()
        if row is None:
            raise TaskNotFound(task_id)
        return _to_task(row)

    async def list(
        self,
        status: TaskStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
        *,
        principal: str | None = None,
    ) -> TaskPage:
        check_limit(limit)
        query = select(tasks).order_by(tasks.c.created_at.desc(), tasks.c.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(tasks.c.status == TaskStatus(status).value)
        if principal is not None:
            query = query.where(tasks.c.principal == principal)
        if cursor:
            created_at, last_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    tasks.c.created_at < created_at,
                    and_(tasks.c.created_at == created_at, tasks.c.id < last_id),
                )
            )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).all()
        items = [_to_task(r) for r in rows[:limit]]
        more = len(rows) > limit
        return TaskPage(
            items=items, next_cursor=encode_cursor(items[-1].created_at, items[-1].id) if more else None
        )

    async def count_active(self, principal: str) -> int:
        active = [s.value for s in TaskStatus if not s.terminal]
        query = select(func.count()).where(tasks.c.principal == principal, tasks.c.status.in_(active))
        async with self._tx(write=False) as conn:
            return int((await conn.execute(query)).scalar_one())

    async def transition(
        self,
        task_id: str,
        expected: Collection[TaskStatus],
        new: TaskStatus,
        *,
        result: str | None = None,
        error: str | None = None,
        usage: Usage | None = None,
        owner: str | None = None,
        reason: str | None = None,
    ) -> Task:
        new = TaskStatus(new)
        allowed = allowed_from(expected, new)
        values = transition_values(new, utcnow(), result=result, error=error, usage=usage)
        values["status"] = new.value
        if usage is not None:
            values["usage"] = usage.model_dump(mode="json")
        async with self._tx() as conn:
            row = None
            if allowed:
                guarded = update(tasks).where(
                    tasks.c.id == task_id, tasks.c.status.in_([s.value for s in allowed])
                )
                if owner is not None:
                    guarded = guarded.where(tasks.c.lease_owner == owner)
                row = (await conn.execute(guarded.values(**values).returning(*tasks.c))).first()
            if row is not None:
                # The UPDATE holds the task's row lock, which queues appenders as in append_event.
                await _insert_event(conn, task_id, "state", state_event(new, reason or error))
                return _to_task(row)
            current = (await conn.execute(select(tasks.c.status).where(tasks.c.id == task_id))).scalar()
        if current is None:
            raise TaskNotFound(task_id)
        raise IllegalTransition(task_id, str(current), new.value)

    async def claim(self, task_id: str, owner: str, ttl_s: float, max_attempts: int) -> Task | None:
        now = utcnow()
        until = lease_until(now, ttl_s)
        claimable = update(tasks).where(
            tasks.c.id == task_id,
            tasks.c.attempts < max_attempts,
            or_(
                tasks.c.status == TaskStatus.QUEUED.value,
                and_(tasks.c.status == TaskStatus.RUNNING.value, tasks.c.lease_expires_at < now),
            ),
        )
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    claimable.values(
                        status=TaskStatus.RUNNING.value,
                        lease_owner=owner,
                        lease_expires_at=until,
                        attempts=tasks.c.attempts + 1,
                        started_at=now,
                    ).returning(*tasks.c)
                )
            ).first()
            if row is not None:
                return _to_task(row)
            exists = (await conn.execute(select(tasks.c.id).where(tasks.c.id == task_id))).first()
        if exists is None:
            raise TaskNotFound(task_id)
        return None

    async def renew(self, task_id: str, owner: str, ttl_s: float) -> bool:
        until = lease_until(utcnow(), ttl_s)
        async with self._tx() as conn:
            renewed = await conn.execute(
                update(tasks)
                .where(
                    tasks.c.id == task_id,
                    tasks.c.status == TaskStatus.RUNNING.value,
                    tasks.c.lease_owner == owner,
                )
                .values(lease_expires_at=until)
            )
        return renewed.rowcount == 1

    async def expired(self, now: datetime | None = None, limit: int = 100) -> builtins.list[Task]:
        check_limit(limit)
        cutoff = as_utc(now) if now is not None else utcnow()
        query = (
            select(tasks)
            .where(tasks.c.status == TaskStatus.RUNNING.value, tasks.c.lease_expires_at < cutoff)
            .order_by(tasks.c.lease_expires_at, tasks.c.id)
            .limit(limit)
        )
        async with self._tx(write=False) as conn:
            return [_to_task(r) for r in (await conn.execute(query)).all()]

    async def record_progress(self, task_id: str, steps: int, usage: Usage) -> None:
        async with self._tx() as conn:
            done = await conn.execute(
                update(tasks)
                .where(tasks.c.id == task_id)
                .values(steps=steps, usage=usage.model_dump(mode="json"))
            )
        if done.rowcount == 0:
            raise TaskNotFound(task_id)

    async def append_event(self, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:
        check_kind(kind)
        async with self._tx() as conn:
            # On PostgreSQL the row lock queues appenders of one task, so max(seq)+1 is
            # unique; SQLite renders no FOR UPDATE but BEGIN IMMEDIATE already serialises.
            owner_row = (
                await conn.execute(select(tasks.c.status).where(tasks.c.id == task_id).with_for_update())
            ).first()
            if owner_row is None:
                raise TaskNotFound(task_id)
            check_log_open(task_id, TaskStatus(owner_row.status), kind)
            return await _insert_event(conn, task_id, kind, data)

    async def events(self, task_id: str, after_seq: int = 0, limit: int = 1000) -> builtins.list[TaskEvent]:
        check_limit(limit)
        query = (
            select(task_events)
            .where(task_events.c.task_id == task_id, task_events.c.seq > after_seq)
            .order_by(task_events.c.seq)
            .limit(limit)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).all()
            if (
                not rows
                and (await conn.execute(select(tasks.c.id).where(tasks.c.id == task_id))).first() is None
            ):
                raise TaskNotFound(task_id)
        return [_to_event(r) for r in rows]


def _bad_value(exc: DBAPIError) -> bool:
    """A value the database cannot hold (NUL in text, an integer out of range): the request's
    fault, not an outage. asyncpg reports a client-side range check as its own ``DataError``,
    a subclass of ``InterfaceError``, so the original exception's type decides too."""
    original = getattr(exc.orig, "__cause__", None) or exc.orig
    return isinstance(exc, DataError) or type(original).__name__ in _BAD_VALUE_ERRORS


_BAD_VALUE_ERRORS = frozenset(
    {
        "DataError",
        "CharacterNotInRepertoireError",
        "UntranslatableCharacterError",
        "NumericValueOutOfRangeError",
    }
)


def _unreachable(exc: DBAPIError) -> bool:
    """Connection trouble (refused, dropped, locked, wrong database) as opposed to a bad statement.

    Drivers report failed connects as plain ``DBAPIError`` (asyncpg) or ``OperationalError``
    (sqlite3); integrity, data and programming errors are ours to fix, not an outage.
    """
    return (
        exc.connection_invalidated
        or isinstance(exc, OperationalError | InterfaceError)
        or type(exc) is DBAPIError
    )


def _first_line(exc: BaseException) -> str:
    """The driver's own reason without SQLAlchemy's SQL echo and background link."""
    original = getattr(exc, "orig", None) or exc
    text_ = str(original).strip().splitlines()
    return text_[0] if text_ else type(original).__name__
