"""Reaching the real services the integration tests use.

Without ``OPSPAWN_REQUIRE_SERVICES=1`` a missing service skips its tests, so a laptop without
RabbitMQ can still run the rest; CI sets the variable, and then a missing service fails the run.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

POSTGRES_URL = os.environ.get(
    "OPSPAWN_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
RABBITMQ_URL = os.environ.get("OPSPAWN_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")

_PORTS = {"postgres": ("127.0.0.1", 5432), "rabbitmq": ("127.0.0.1", 5672)}


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
