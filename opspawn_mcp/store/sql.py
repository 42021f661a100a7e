"""The SQL store: SQLite (one machine) or PostgreSQL (many workers) through SQLAlchemy async Core.

The queries; the tables and migrations are ``store/sql_schema.py``.
See docs/architecture.md, "The SQL store" and "Events wake watchers".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect as pyinspect
import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    Row,
    Table,
    Text,
    and_,
    bindparam,
    event,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from opspawn_mcp.config import StoreSettings
from opspawn_mcp.errors import Conflict, IllegalTransition, InvalidInput, TaskNotFound, Unavailable
from opspawn_mcp.models import ApprovalRequest, ExposedCall, Task, TaskEvent, TaskStatus, Usage, utcnow
from opspawn_mcp.store import pool_size_for
from opspawn_mcp.store._common import approval_document, as_utc, check_log_open, lease_until, state_event
from opspawn_mcp.store.base import JournalKeyTaken, JournalRow, KeyTaken, Move, Progress, TaskStore, Window
from opspawn_mcp.store.changes import ChangeHub
from opspawn_mcp.store.sql_schema import (
    exposed_calls,
    migrate,
    schema_version,
    task_events,
    task_journal,
    tasks,
)

SQLITE_BUSY_TIMEOUT_S: Final = 30.0
PG_CONNECT_TIMEOUT_S: Final = 10.0
# The pool's defaults are the config's (``opspawn.store``), stated there once.
_DEFAULTS: Final = StoreSettings()
# Renewals per statement: 2 bind parameters each, well inside SQLite's and asyncpg's limits.
RENEW_CHUNK: Final = 1000
_T = TypeVar("_T")
NOTIFY_CHANNEL: Final = "opspawn_events"
# While the LISTEN connection is down: one query for every waiter of the store this often.
FALLBACK_POLL_S: Final = 1.0
# SQLite has no NOTIFY: one query for every waiter of the store this often (other processes).
SQLITE_POLL_S: Final = 1.0
# Reconnecting the listener: first at once, then doubling up to this.
LISTEN_BACKOFF_MAX_S: Final = 10.0
# How often an idle listener proves its connection alive (and checks it still has waiters).
LISTEN_KEEPALIVE_S: Final = 30.0
# The listener or the SQLite poll stops this long after the store's last waiter left.
WATCH_LINGER_S: Final = 60.0
# Task ids per poll statement.
POLL_CHUNK: Final = 500
# NOTIFY payloads must stay under 8000 bytes; a longer id sends "" (poll everyone) instead.
_PAYLOAD_ID_MAX: Final = 1000
_log = logging.getLogger(__name__)
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _to_task(row: Row[Any]) -> Task:
    """The task a ``tasks`` row holds (the model ignores the store's own columns)."""
    return Task.model_validate(dict(row._mapping))


def _to_event(row: Row[Any]) -> TaskEvent:
    m = row._mapping
    return TaskEvent(task_id=m["task_id"], seq=m["seq"], time=m["time"], kind=m["kind"], data=m["data"])


def _b(name: str, column: Column[Any]) -> Any:
    """A named bind parameter with its column's type (UTC conversion, JSON on each dialect)."""
    return bindparam(name, type_=column.type)


_RUNNING = TaskStatus.RUNNING.value
_QUEUED = TaskStatus.QUEUED.value

# The hot statements, built once: a call binds values and reuses the compiled form, instead of
# building a statement and its cache key every time (most of the store's CPU before).
_GET = select(tasks).where(tasks.c.id == bindparam("b_id"))
_BY_KEY = select(tasks).where(
    tasks.c.principal == bindparam("b_principal"), tasks.c.idempotency_key == bindparam("b_key")
)
_EXISTS = select(tasks.c.id).where(tasks.c.id == bindparam("b_id"))
_STATUS = select(tasks.c.status).where(tasks.c.id == bindparam("b_id"))
_INSERT_TASK = insert(tasks).returning(*tasks.c)
_INSERT_EVENT = insert(task_events).values(
    task_id=bindparam("b_id"),
    seq=bindparam("b_seq"),
    time=_b("b_time", task_events.c.time),
    kind=bindparam("b_kind"),
    data=_b("b_data", task_events.c.data),
)
# Numbers the next event and takes the row lock that queues the task's other appenders.
_NEXT_SEQ = (
    update(tasks)
    .where(tasks.c.id == bindparam("b_id"))
    .values(last_seq=tasks.c.last_seq + 1)
    .returning(tasks.c.last_seq, tasks.c.status)
)
# The task's row while ``b_owner`` holds it running: the guard of every write a worker makes.
_HELD = and_(
    tasks.c.id == bindparam("b_id"), tasks.c.status == _RUNNING, tasks.c.lease_owner == bindparam("b_owner")
)
# record(): the guard, the seq and the progress in one statement.
_RECORD = (
    update(tasks)
    .where(_HELD)
    .values(
        last_seq=tasks.c.last_seq + 1,
        steps=bindparam("b_steps"),
        usage=_b("b_usage", tasks.c.usage),
    )
    .returning(tasks.c.last_seq)
)
_INSERT_JOURNAL = insert(task_journal).values(
    task_id=bindparam("b_id"),
    kind=bindparam("b_kind"),
    ordinal=bindparam("b_ordinal"),
    attempt=bindparam("b_attempt"),
    step=bindparam("b_step"),
    data=_b("b_data", task_journal.c.data),
    time=_b("b_time", task_journal.c.time),
)
_JOURNAL = select(task_journal).where(task_journal.c.task_id == bindparam("b_id"))
_CLAIM = (
    update(tasks)
    .where(
        tasks.c.id == bindparam("b_id"),
        tasks.c.attempts < bindparam("b_max"),
        or_(
            tasks.c.status == _QUEUED,
            and_(
                tasks.c.status == _RUNNING, tasks.c.lease_expires_at < _b("b_now", tasks.c.lease_expires_at)
            ),
        ),
    )
    .values(
        status=_RUNNING,
        lease_owner=bindparam("b_owner"),
        lease_expires_at=_b("b_until", tasks.c.lease_expires_at),
        attempts=tasks.c.attempts + 1,
        started_at=_b("b_started", tasks.c.started_at),
    )
    .returning(*tasks.c)
)
_RENEW = update(tasks).where(_HELD).values(lease_expires_at=_b("b_until", tasks.c.lease_expires_at))
_RENEW_MANY = (
    update(tasks)
    .where(
        tasks.c.status == _RUNNING,
        tuple_(tasks.c.id, tasks.c.lease_owner).in_(bindparam("b_leases", expanding=True)),
    )
    .values(lease_expires_at=_b("b_until", tasks.c.lease_expires_at))
    .returning(tasks.c.id)
)
_PROGRESS = (
    update(tasks)
    .where(tasks.c.id == bindparam("b_id"))
    .values(steps=bindparam("b_steps"), usage=_b("b_usage", tasks.c.usage))
)
# PostgreSQL: the insert and its NOTIFY as one statement; delivered only if the transaction commits.
_INSERT_EVENT_NOTIFY = select(
    func.pg_notify(bindparam("b_channel", type_=Text), bindparam("b_payload", type_=Text))
).select_from(_INSERT_EVENT.returning(task_events.c.seq).cte("appended"))
# Where each watched task's log has got to: the catch-up and fallback poll.
_LAST_SEQS = select(tasks.c.id, tasks.c.last_seq).where(tasks.c.id.in_(bindparam("b_ids", expanding=True)))
_EVENTS = (
    select(task_events)
    .where(task_events.c.task_id == bindparam("b_id"), task_events.c.seq > bindparam("b_after"))
    .order_by(task_events.c.seq)
    .limit(bindparam("b_limit", type_=Integer))
)


@functools.lru_cache(maxsize=256)
def _transition_statement(
    allowed: tuple[str, ...], columns: tuple[str, ...], guarded: bool, refund: bool, events: int
) -> Any:
    """The compare-and-set of one transition shape (which statuses, which columns, owner or
    not, whether the attempt is given back, how many events it numbers), built once per shape:
    there are a few dozen shapes, and transitions are hot."""
    where = [tasks.c.id == bindparam("b_id"), tasks.c.status.in_(allowed)]
    if guarded:
        where.append(tasks.c.lease_owner == bindparam("b_owner"))
    values: dict[str, Any] = {c: _b(f"b_{c}", tasks.c[c]) for c in columns}
    values["last_seq"] = tasks.c.last_seq + events
    if refund:
        values["attempts"] = tasks.c.attempts - 1
    return update(tasks).where(*where).values(**values).returning(*tasks.c)


def _move_statement(move: Move) -> tuple[Any, dict[str, Any]]:
    """The compare-and-set of ``move`` and its bound values; no statement when no status allows it."""
    if not move.allowed:
        return None, {"b_id": move.task_id}
    approval: ApprovalRequest | None = move.values["approval"]
    values = dict(move.values)
    values["status"] = move.new.value
    values["approval"] = approval_document(approval)
    values["approval_expires_at"] = approval.expires_at if approval is not None else None
    if values.get("usage") is not None:
        values["usage"] = values["usage"].model_dump(mode="json")
    columns = tuple(sorted(values))
    statement = _transition_statement(
        tuple(s.value for s in move.allowed),
        columns,
        move.owner is not None,
        move.refund,
        1 + bool(move.event),
    )
    params = {f"b_{c}": values[c] for c in columns} | {"b_id": move.task_id}
    if move.owner is not None:
        params["b_owner"] = move.owner
    return statement, params


def _newest_first(table: Table, at: Column[Any], window: Window) -> Any:
    """``table``'s rows in ``window``: fields equal to its ``match``, newest ``(at, id)`` first, at
    most one row more than the page, only rows older than the cursor (keyset pagination)."""
    row_id = table.c.id
    statement = (
        select(table)
        .where(*(table.c[name] == value for name, value in window.match.items()))
        .order_by(at.desc(), row_id.desc())
        .limit(window.limit + 1)
    )
    if window.after is None:
        return statement
    after, last_id = window.after
    return statement.where(or_(at < after, and_(at == after, row_id < last_id)))


# Each status with a deadline, and the column that keeps it: a running task's lease, a paused
# task's approval request.
_DEADLINES = {
    TaskStatus.RUNNING: tasks.c.lease_expires_at,
    TaskStatus.INPUT_REQUIRED: tasks.c.approval_expires_at,
}


async def _insert_event(
    conn: AsyncConnection,
    task_id: str,
    seq: int,
    kind: str,
    data: dict[str, Any],
    channel: str | None,
) -> TaskEvent:
    """Insert the event numbered ``seq``, which the caller took from ``last_seq`` under the row lock,
    and (PostgreSQL: ``channel`` given) NOTIFY watchers in other processes in the same statement."""
    now = utcnow()
    params: dict[str, Any] = {"b_id": task_id, "b_seq": seq, "b_time": now, "b_kind": kind, "b_data": data}
    if channel is None:
        await conn.execute(_INSERT_EVENT, params)
    else:
        params["b_channel"] = channel
        params["b_payload"] = f"{task_id}:{seq}" if len(task_id) <= _PAYLOAD_ID_MAX else ""
        await conn.execute(_INSERT_EVENT_NOTIFY, params)
    return TaskEvent.model_validate({"task_id": task_id, "seq": seq, "time": now, "kind": kind, "data": data})


async def _insert_entries(
    conn: AsyncConnection, task_id: str, entries: Sequence[JournalRow], time: datetime
) -> None:
    """Insert journal rows in the caller's transaction; a key that exists is ``Conflict``, raised
    inside the transaction so everything else it wrote rolls back too."""
    for row in entries:
        try:
            await conn.execute(
                _INSERT_JOURNAL,
                {
                    "b_id": task_id,
                    "b_kind": row.kind,
                    "b_ordinal": row.ordinal,
                    "b_attempt": row.attempt,
                    "b_step": row.step,
                    "b_data": row.data,
                    "b_time": time,
                },
            )
        except IntegrityError as exc:
            raise JournalKeyTaken(task_id, row) from exc


def notify_channel(schema: str | None) -> str:
    """The NOTIFY channel of a store: one per schema, so stores sharing a server stay apart.

    A hash, not the name: a channel is an identifier of at most 63 bytes, and a schema name may
    use all 63 itself."""
    if schema is None:
        return NOTIFY_CHANNEL
    return f"{NOTIFY_CHANNEL}_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


def _retryable(exc: Unavailable, *, idempotent: bool) -> bool:
    """Whether a fresh connection may simply run the transaction again.

    Only when the connection turned out dead (server restarted, backend killed; SQLAlchemy has
    then invalidated it and its generation). An idempotent body may always run again. Any other
    body only when the driver refused before sending anything: asyncpg's "connection is closed"
    comes from its own check ahead of every send, so the server never saw this transaction's
    COMMIT and has rolled back whatever it did see. A connection lost mid-statement (maybe after
    a COMMIT arrived) is the caller's call, because the write may have happened.
    """
    cause = exc.__cause__
    if not isinstance(cause, DBAPIError) or not cause.connection_invalidated:
        return False
    if idempotent:
        return True
    original = getattr(cause.orig, "__cause__", None) or cause.orig
    return type(original).__name__ == "InterfaceError" and str(original) == "connection is closed"


class SqlStore(TaskStore):
    """``TaskStore`` on ``sqlite+aiosqlite:///path`` or ``postgresql+asyncpg://...``.

    Build it cheaply, then ``await start()`` to connect and migrate; ``close()`` disposes
    the connection pool. ``schema`` (PostgreSQL only) may also come as ``?schema=`` in the URL.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = pool_size_for(None, None),
        max_overflow: int | None = None,
        pool_timeout_s: float = _DEFAULTS.pool_timeout_s,
        pool_recycle_s: float = _DEFAULTS.pool_recycle_s,
    ) -> None:
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
        if pool_size < 1 or pool_timeout_s <= 0 or pool_recycle_s <= 0:
            raise InvalidInput("The store pool needs pool_size >= 1 and positive timeout and recycle.")
        self._pool_size = pool_size
        # A little headroom for bursts (recovery, heartbeats), not a second pool.
        self._max_overflow = max_overflow if max_overflow is not None else min(8, max(2, pool_size // 4))
        self._pool_timeout_s = pool_timeout_s
        self._pool_recycle_s = pool_recycle_s
        self.changes = ChangeHub()
        self.channel = notify_channel(schema)
        self._notify_on: str | None = None if self._sqlite else self.channel
        # The listener (PostgreSQL) or the shared poll (SQLite); None when no one waits.
        self._watcher: asyncio.Task[None] | None = None
        self._listening = False
        self._kicks: set[asyncio.Task[None]] = set()

    @property
    def schema(self) -> str | None:
        return self._schema

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up: wakeups from other processes arrive at once;
        otherwise they arrive through the fallback poll."""
        return self._listening

    @property
    def pool_size(self) -> int:
        return self._pool_size

    def _where(self) -> str:
        """The database, password hidden, for messages."""
        where = self._url.render_as_string(hide_password=True)
        return f"{where} (schema {self._schema})" if self._schema else where

    def _pool_args(self) -> dict[str, Any]:
        """Pool sized to the work; no pre-ping (a round trip per checkout): stale connections are
        recycled by age, and a dead one invalidates its generation on first use (see ``_run``)."""
        return {
            "pool_size": self._pool_size,
            "max_overflow": self._max_overflow,
            "pool_timeout": self._pool_timeout_s,
            "pool_recycle": self._pool_recycle_s,
            "pool_pre_ping": False,
        }

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
            engine = create_async_engine(
                self._url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **self._pool_args()
            )
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
        return create_async_engine(self._url, connect_args=connect_args, **self._pool_args())

    def _unavailable(self, exc: BaseException) -> Unavailable:
        return Unavailable(
            f"The task database {self._where()} cannot be reached or is busy: {_first_line(exc)}. "
            "Check that it is running and store_url is right, then retry."
        )

    @asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[AsyncConnection]:
        """One transaction; a lost or unreachable database, or a pool with no free connection,
        becomes ``Unavailable`` (an outage the caller retries, never a bug that kills it)."""
        if self._engine is None:
            raise Unavailable("The task store is not started; call start() first.")
        try:
            async with self._engine.connect() as conn:
                if write and self._sqlite:
                    await conn.execution_options(opspawn_begin="IMMEDIATE")
                async with conn.begin():
                    yield conn
        except PoolTimeout as exc:
            raise Unavailable(
                f"The task database {self._where()} has no free connection: all "
                f"{self._pool_size + self._max_overflow} are busy and none came free within "
                f"{self._pool_timeout_s:g} s. Retry; if it persists raise opspawn.store.pool_size "
                "or lower opspawn.worker.concurrency."
            ) from exc
        except DBAPIError as exc:
            if _bad_value(exc):
                raise InvalidInput(
                    f"The database refused a value of this request: {_first_line(exc)}. "
                    "Remove control characters (NUL) and keep numbers within range."
                ) from exc
            if not _unreachable(exc):
                raise  # a bug in a statement, not an outage: let it show as one
            raise self._unavailable(exc) from exc
        except (OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def _run(
        self,
        body: Callable[[AsyncConnection], Awaitable[_T]],
        *,
        write: bool = False,
        idempotent: bool = True,
    ) -> _T:
        """Run ``body`` in one transaction, and once more on a fresh connection if the first
        turned out dead and running it again is safe (``_retryable``).

        Without a pre-ping, the first statement on a connection the server dropped (a restart,
        a killed backend) is what finds out; SQLAlchemy then invalidates that pool generation,
        so the retry gets a fresh connection and the caller never sees the stale one.
        """
        try:
            async with self._tx(write=write) as conn:
                return await body(conn)
        except Unavailable as exc:
            if not _retryable(exc, idempotent=idempotent):
                raise
        async with self._tx(write=write) as conn:
            return await body(conn)

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
            await conn.run_sync(migrate)

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        for task in (watcher, *self._kicks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.changes.wake_all()  # parked watchers re-read now and learn the store is closed
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def ping(self) -> None:
        async def body(conn: AsyncConnection) -> None:
            await conn.execute(text("SELECT 1"))

        await self._run(body)

    async def schema_version(self) -> int:
        """The version recorded in ``schema_version`` (0 if the table is empty)."""

        async def body(conn: AsyncConnection) -> int:
            return int((await conn.execute(select(func.max(schema_version.c.version)))).scalar() or 0)

        return await self._run(body)

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
            "last_seq": 1,
            "enqueued_at": task.enqueued_at,
            "idempotency_key": task.idempotency_key,
        }

        async def body(conn: AsyncConnection) -> Row[Any]:
            row = (await conn.execute(_INSERT_TASK, values)).one()
            # The first event in the same transaction: nobody sees the task without it.
            await _insert_event(conn, task.id, 1, "state", state_event(task.status, None), self._notify_on)
            return row

        try:
            row = await self._run(body, write=True, idempotent=False)
        except IntegrityError as exc:
            holder = None
            if task.idempotency_key is not None:
                holder = await self.get_by_key(task.principal, task.idempotency_key)
            if holder is not None:
                raise KeyTaken(holder) from exc
            raise Conflict(f"A task with id {task.id!r} already exists; create it with a new id.") from exc
        self.changes.notify(task.id, 1)
        return _to_task(row)

    async def get_by_key(self, principal: str, key: str) -> Task | None:
        async def body(conn: AsyncConnection) -> Row[Any] | None:
            return (await conn.execute(_BY_KEY, {"b_principal": principal, "b_key": key})).first()

        row = await self._run(body)
        return None if row is None else _to_task(row)

    async def get(self, task_id: str) -> Task:
        async def body(conn: AsyncConnection) -> Row[Any] | None:
            return (await conn.execute(_GET, {"b_id": task_id})).first()

        row = await self._run(body)
        if row is None:
            raise TaskNotFound(task_id)
        return _to_task(row)

    async def _list_tasks(self, window: Window) -> list[Task]:
        statement = _newest_first(tasks, tasks.c.created_at, window)
        if window.goal_contains:
            goal = tasks.c.spec["goal"].as_string()
            statement = statement.where(goal.icontains(window.goal_contains, autoescape=True))
        return [_to_task(r) for r in await self._rows(statement)]

    async def _rows(self, query: Any) -> list[Row[Any]]:
        async def body(conn: AsyncConnection) -> list[Row[Any]]:
            return list((await conn.execute(query)).all())

        return await self._run(body)

    async def record_call(self, call: ExposedCall) -> None:
        query = insert(exposed_calls).values(call.model_dump() | {"at": as_utc(call.at)})

        async def body(conn: AsyncConnection) -> None:
            try:
                await conn.execute(query)
            except IntegrityError as exc:
                raise Conflict(f"An exposed call with id {call.id!r} is already recorded.") from exc

        await self._run(body, write=True, idempotent=False)

    async def _list_calls(self, window: Window) -> list[ExposedCall]:
        statement = _newest_first(exposed_calls, exposed_calls.c.at, window)
        return [ExposedCall.model_validate(dict(r._mapping)) for r in await self._rows(statement)]

    async def mark_enqueued(self, task_id: str) -> None:
        query = (
            update(tasks)
            .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.QUEUED.value)
            .values(enqueued_at=utcnow())
        )

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(query)

        await self._run(body, write=True)

    async def _unenqueued(self, cutoff: datetime, limit: int) -> list[str]:
        query = (
            select(tasks.c.id)
            .where(
                tasks.c.status == TaskStatus.QUEUED.value,
                tasks.c.enqueued_at.is_(None),
                tasks.c.created_at < cutoff,
            )
            .order_by(tasks.c.created_at, tasks.c.id)
            .limit(limit)
        )

        async def body(conn: AsyncConnection) -> list[str]:
            return list((await conn.execute(query)).scalars().all())

        return await self._run(body)

    async def count_active(self, principal: str) -> int:
        active = [s.value for s in TaskStatus if not s.terminal]
        query = select(func.count()).where(tasks.c.principal == principal, tasks.c.status.in_(active))

        async def body(conn: AsyncConnection) -> int:
            return int((await conn.execute(query)).scalar_one())

        return await self._run(body)

    async def count_by_status(self) -> dict[TaskStatus, int]:
        query = select(tasks.c.status, func.count()).group_by(tasks.c.status)

        async def body(conn: AsyncConnection) -> dict[TaskStatus, int]:
            found = {TaskStatus(status): int(n) for status, n in (await conn.execute(query)).all()}
            return {status: found.get(status, 0) for status in TaskStatus}

        return await self._run(body)

    async def _move(self, move: Move) -> Task:
        task_id = move.task_id
        statement, params = _move_statement(move)

        async def body(conn: AsyncConnection) -> tuple[Task, int] | str | None:
            """The moved task and its event's seq, or (the guard did not match) the current
            status or None."""
            row = (await conn.execute(statement, params)).first() if statement is not None else None
            if row is not None:
                # The UPDATE bumped last_seq (once per event) and holds the row lock, as in
                # append_event.
                seq = int(row.last_seq)
                if move.event is not None:
                    await _insert_event(conn, task_id, seq - 1, *move.event, self._notify_on)
                written = await _insert_event(conn, task_id, seq, "state", move.state, self._notify_on)
                await _insert_entries(conn, task_id, move.entries, written.time)
                return _to_task(row), seq
            return (await conn.execute(_STATUS, {"b_id": task_id})).scalar()

        current = await self._run(body, write=True, idempotent=False)
        if isinstance(current, tuple):
            self.changes.notify(task_id, current[1])
            return current[0]
        if current is None:
            raise TaskNotFound(task_id)
        raise IllegalTransition(task_id, str(current), move.new.value)

    async def claim(self, task_id: str, owner: str, ttl_s: float, max_attempts: int) -> Task | None:
        now = utcnow()
        params = {
            "b_id": task_id,
            "b_max": max_attempts,
            "b_now": now,
            "b_owner": owner,
            "b_until": lease_until(now, ttl_s),
            "b_started": now,
        }

        async def body(conn: AsyncConnection) -> Task | None:
            row = (await conn.execute(_CLAIM, params)).first()
            if row is not None:
                return _to_task(row)
            if (await conn.execute(_EXISTS, {"b_id": task_id})).first() is None:
                raise TaskNotFound(task_id)
            return None

        return await self._run(body, write=True, idempotent=False)

    async def renew(self, task_id: str, owner: str, ttl_s: float) -> bool:
        params = {"b_id": task_id, "b_owner": owner, "b_until": lease_until(utcnow(), ttl_s)}

        async def body(conn: AsyncConnection) -> int:
            return (await conn.execute(_RENEW, params)).rowcount

        return await self._run(body, write=True) == 1

    async def renew_many(self, leases: Mapping[str, str], ttl_s: float) -> set[str]:
        until = lease_until(utcnow(), ttl_s)
        pairs = list(leases.items())
        if not pairs:
            return set()

        async def body(conn: AsyncConnection) -> set[str]:
            held: set[str] = set()
            for start in range(0, len(pairs), RENEW_CHUNK):
                chunk = pairs[start : start + RENEW_CHUNK]
                result = await conn.execute(_RENEW_MANY, {"b_leases": chunk, "b_until": until})
                held.update(result.scalars().all())
            return held

        return await self._run(body, write=True)

    async def _past_deadline(self, status: TaskStatus, cutoff: datetime, limit: int) -> list[Task]:
        deadline = _DEADLINES[status]
        query = (
            select(tasks)
            .where(tasks.c.status == status.value, deadline < cutoff)
            .order_by(deadline, tasks.c.id)
            .limit(limit)
        )
        return [_to_task(r) for r in await self._rows(query)]

    async def record_progress(self, task_id: str, steps: int, usage: Usage) -> None:
        params = {"b_id": task_id, "b_steps": steps, "b_usage": usage.model_dump(mode="json")}

        async def body(conn: AsyncConnection) -> int:
            return (await conn.execute(_PROGRESS, params)).rowcount

        if await self._run(body, write=True) == 0:
            raise TaskNotFound(task_id)

    async def _append_event(self, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:

        async def body(conn: AsyncConnection) -> TaskEvent:
            # Numbering the event locks the task's row (PostgreSQL; SQLite's BEGIN IMMEDIATE
            # already serialises writers), so seqs are unique and gapless; a refusal below
            # rolls the bump back with everything else.
            bumped = (await conn.execute(_NEXT_SEQ, {"b_id": task_id})).first()
            if bumped is None:
                raise TaskNotFound(task_id)
            check_log_open(task_id, TaskStatus(bumped.status), kind)
            return await _insert_event(conn, task_id, bumped.last_seq, kind, data, self._notify_on)

        event = await self._run(body, write=True, idempotent=False)
        self.changes.notify(task_id, event.seq)
        return event

    async def _record(self, progress: Progress) -> TaskEvent | None:
        task_id = progress.task_id
        params = {
            "b_id": task_id,
            "b_owner": progress.owner,
            "b_steps": progress.steps,
            "b_usage": progress.usage.model_dump(mode="json"),
        }

        async def body(conn: AsyncConnection) -> TaskEvent | None:
            seq = (await conn.execute(_RECORD, params)).scalar()
            if seq is None:
                if (await conn.execute(_EXISTS, {"b_id": task_id})).first() is None:
                    raise TaskNotFound(task_id)
                return None  # not ours any more: the guard matched nothing, nothing was written
            event = await _insert_event(
                conn, task_id, int(seq), progress.kind, progress.data, self._notify_on
            )
            await _insert_entries(conn, task_id, progress.entries, event.time)
            return event

        written = await self._run(body, write=True, idempotent=False)
        if written is not None:
            self.changes.notify(task_id, written.seq)
        return written

    async def _task_rows(self, statement: Any, params: dict[str, Any]) -> list[Row[Any]]:
        """The rows ``statement`` reads for the task ``params["b_id"]``; no rows and no such task
        is ``TaskNotFound`` (checked in the same transaction, only when there are no rows)."""
        task_id = params["b_id"]

        async def body(conn: AsyncConnection) -> list[Row[Any]] | None:
            rows = list((await conn.execute(statement, params)).all())
            if not rows and (await conn.execute(_EXISTS, {"b_id": task_id})).first() is None:
                return None
            return rows

        rows = await self._run(body)
        if rows is None:
            raise TaskNotFound(task_id)
        return rows

    async def journal(self, task_id: str) -> list[JournalRow]:
        rows = await self._task_rows(_JOURNAL, {"b_id": task_id})
        stored = [
            JournalRow(kind=r.kind, ordinal=r.ordinal, step=r.step, attempt=r.attempt, data=r.data)
            for r in rows
        ]
        stored.sort(key=lambda e: e.order)
        return stored

    async def _events(self, task_id: str, after_seq: int, limit: int) -> list[TaskEvent]:
        rows = await self._task_rows(_EVENTS, {"b_id": task_id, "b_after": after_seq, "b_limit": limit})
        return [_to_event(r) for r in rows]

    # -- watchers ---------------------------------------------------------------------------

    async def wait_for_change(self, task_id: str, seq: int, timeout_s: float) -> bool:
        if self._engine is None:
            return True  # closed or not started: the caller's next read says so
        if self._watcher is None or self._watcher.done():
            body = self._poll_sqlite() if self._sqlite else self._listen()
            self._watcher = asyncio.get_running_loop().create_task(body, name=f"opspawn-watch {self.channel}")
        return await self.changes.wait(task_id, seq, timeout_s)

    def _still_mine(self, idle_s: float) -> bool:
        """Whether the running watcher task should go on. After ``WATCH_LINGER_S`` without
        waiters it detaches itself synchronously, so a waiter arriving while it cleans up
        starts a new one instead of trusting a watcher that is leaving."""
        if idle_s < WATCH_LINGER_S or self.changes.waiting:
            return self._watcher is asyncio.current_task()
        if self._watcher is asyncio.current_task():
            self._watcher = None
        return False

    async def _poll_watched(self) -> None:
        """One query for every task someone waits on; wakes those whose log moved on. A failure
        is the outage the watchers' own reads will report, so it is logged, not raised."""
        ids = list(self.changes.watched())
        if not ids:
            return

        async def body(conn: AsyncConnection) -> list[Any]:
            rows: list[Any] = []
            for start in range(0, len(ids), POLL_CHUNK):
                chunk = ids[start : start + POLL_CHUNK]
                rows += list((await conn.execute(_LAST_SEQS, {"b_ids": chunk})).all())
            return rows

        try:
            rows = await self._run(body)
        except Exception as exc:  # the background task that polls must outlive any one failure
            _log.debug("watch poll failed: %s", exc)
            return
        for row in rows:
            self.changes.notify(row.id, int(row.last_seq))

    async def _poll_sqlite(self) -> None:
        """SQLite: writers of this store notify directly; this one query per ``SQLITE_POLL_S``
        for all waiters catches writers in other processes (SQLite has no NOTIFY)."""
        idle_s = 0.0
        while self._still_mine(idle_s):
            await asyncio.sleep(SQLITE_POLL_S)
            if self.changes.waiting:
                idle_s = 0.0
                await self._poll_watched()
            else:
                idle_s += SQLITE_POLL_S

    async def _listen(self) -> None:
        """PostgreSQL: keep one LISTEN connection while anyone waits; while it is down, poll
        for everyone every ``FALLBACK_POLL_S``, reconnecting at once and then with a doubling
        backoff up to ``LISTEN_BACKOFF_MAX_S``."""
        backoff = 0.0
        idle_s = 0.0
        while self._still_mine(idle_s):
            try:
                conn = await self._connect_listener()
            except Exception as exc:  # any failure to connect means "poll for now"
                _log.info("store listener cannot connect (%s); polling every %gs", exc, FALLBACK_POLL_S)
                backoff = min(max(backoff * 2, FALLBACK_POLL_S), LISTEN_BACKOFF_MAX_S)
                waited = 0.0
                while waited < backoff:
                    await self._poll_watched()
                    await asyncio.sleep(FALLBACK_POLL_S)
                    waited += FALLBACK_POLL_S
                idle_s = 0.0 if self.changes.waiting else idle_s + waited
                continue
            backoff = 0.0
            try:
                idle_s = await self._serve_listener(conn)
            except Exception as exc:  # a lost listener falls back; it never fails the waiters
                _log.info("store listener lost (%s); reconnecting", exc)
            finally:
                self._listening = False
                conn.terminate()
            await self._poll_watched()  # whoever a write reached while nobody listened

    async def _connect_listener(self) -> Any:
        """A connection of its own, outside the pool, with the pool's connect arguments."""
        import asyncpg  # type: ignore[import-untyped]

        assert self._engine is not None
        _, kwargs = self._engine.dialect.create_connect_args(self._url)
        accepted = pyinspect.signature(asyncpg.connect).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        kwargs["timeout"] = PG_CONNECT_TIMEOUT_S
        kwargs["server_settings"] = {"application_name": f"opspawn-listen {self.channel}"}
        return await asyncpg.connect(**kwargs)

    async def _serve_listener(self, conn: Any) -> float:
        """LISTEN on ``conn`` until it is lost (returns 0), or until nobody has waited for
        ``WATCH_LINGER_S`` (returns the idle time, detached)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(self.channel, self._on_notification)
        self._listening = True
        await self._poll_watched()  # what was written before LISTEN took effect
        idle_s = 0.0
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_KEEPALIVE_S):
                    await lost.wait()
                break
            idle_s = 0.0 if self.changes.waiting else idle_s + LISTEN_KEEPALIVE_S
            if not self._still_mine(idle_s):
                return idle_s
            await conn.execute("SELECT 1", timeout=PG_CONNECT_TIMEOUT_S)  # a half-open socket raises
        return 0.0

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        task_id, _, seq = payload.rpartition(":")
        if task_id and seq.isdigit():
            self.changes.notify(task_id, int(seq))
            return
        # An id too long to name in a payload: ask the database about every watched task.
        kick = asyncio.get_running_loop().create_task(self._poll_watched())
        self._kicks.add(kick)
        kick.add_done_callback(self._kicks.discard)


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
