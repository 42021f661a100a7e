"""Reaching the real services the integration tests use.

Without ``OPSPAWN_REQUIRE_SERVICES=1`` a missing service skips its tests, so a laptop without
RabbitMQ can still run the rest; CI sets the variable, and then a missing service fails the run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest

from opspawn_mcp.store import TaskStore, open_store

POSTGRES_URL = os.environ.get(
    "OPSPAWN_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
RABBITMQ_URL = os.environ.get("OPSPAWN_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")

_PG = urlsplit(POSTGRES_URL)
_RABBIT = urlsplit(RABBITMQ_URL)
_PORTS = {
    "postgres": (_PG.hostname or "127.0.0.1", _PG.port or 5432),
    "rabbitmq": (_RABBIT.hostname or "127.0.0.1", _RABBIT.port or 5672),
}


def services_required() -> bool:
    return os.environ.get("OPSPAWN_REQUIRE_SERVICES") == "1"


def unavailable(what: str) -> None:
    """Fail (in CI) or skip (elsewhere) the calling test because ``what`` is missing."""
    message = f"{what} is not available"
    if services_required():
        pytest.fail(f"{message}, and OPSPAWN_REQUIRE_SERVICES=1 says it must be", pytrace=False)
    pytest.skip(message)


def require_service(name: str) -> None:
    host, port = _PORTS[name]
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        unavailable(f"{name} on {host}:{port}")
    if name == "postgres":
        problem = postgres_problem(POSTGRES_URL)
        if problem is not None:
            pytest.fail(problem, pytrace=False)


@functools.cache
def postgres_problem(url: str) -> str | None:
    """Why the PostgreSQL tests cannot use ``url`` although the server answers, in words that say
    what to do (a missing database, a refused role); None when a connection works. Connects once
    per URL, on a thread of its own, so it works inside a running event loop too."""
    import asyncpg

    parts = urlsplit(url.replace("+asyncpg", ""))
    database = parts.path.lstrip("/") or "postgres"
    fix = (
        f"create it (`createdb {database}`, as a role that may) or point OPSPAWN_TEST_POSTGRES_URL "
        "at one that exists (postgresql+asyncpg://USER@HOST:PORT/DB)"
    )
    outcome: list[str | None] = []

    async def probe() -> None:
        connection = await asyncpg.connect(parts.geturl(), timeout=5)
        await connection.close()

    def run() -> None:
        try:
            asyncio.run(probe())
            outcome.append(None)
        except asyncpg.InvalidCatalogNameError:
            outcome.append(f"PostgreSQL answers, but it has no database {database!r}: {fix}")
        except Exception as exc:  # a refused role, a password, TLS: say which, and what to set
            outcome.append(
                f"PostgreSQL answers, but {url} does not work ({type(exc).__name__}: {exc}): {fix}"
            )

    thread = threading.Thread(target=run, name="postgres-probe")
    thread.start()
    thread.join()
    return outcome[0] if outcome else "the PostgreSQL probe ended without an answer"


def require_command(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        unavailable(f"the command {command!r}")
    assert path is not None
    return path


def delete_queues(queue: str) -> None:
    """Delete a test's RabbitMQ queue and the delay and dead-letter queues Dramatiq made for it."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(queue=name)
    finally:
        connection.close()


async def drop_schema(schema: str) -> None:
    """Drop a test's PostgreSQL schema and everything in it."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(POSTGRES_URL)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


@asynccontextmanager
async def started_store(url: str) -> AsyncIterator[TaskStore]:
    """An instance's store, read from the test as any other process of that instance would."""
    store = open_store(url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()
