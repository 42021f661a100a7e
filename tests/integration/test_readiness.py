"""Readiness (``TaskService.ready``, REST ``/readyz``, gRPC health) covers the broker as well as
the store: a server whose RabbitMQ is gone must stop saying it can take work."""

from __future__ import annotations

import socket

import pytest

from opspawn_mcp.broker import DramatiqEnqueuer
from opspawn_mcp.config import parse_config
from opspawn_mcp.errors import Unavailable
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.services import RABBITMQ_URL, require_service


class NoServers:
    def servers_info(self) -> list[object]:
        return []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def service_for(broker_url: str) -> tuple[TaskService, DramatiqEnqueuer, MemoryStore]:
    config = parse_config({"opspawn": {"store_url": "memory://", "broker_url": broker_url}}, environ={})
    store = MemoryStore()
    await store.start()
    enqueuer = DramatiqEnqueuer.for_config(config)
    return TaskService(config, store, enqueuer, NoServers()), enqueuer, store  # type: ignore[arg-type]


async def test_ready_with_a_live_rabbitmq() -> None:
    require_service("rabbitmq")
    service, enqueuer, store = await service_for(RABBITMQ_URL)
    async with enqueuer:
        await service.ready()
    await store.close()


async def test_not_ready_when_rabbitmq_cannot_be_reached() -> None:
    service, enqueuer, store = await service_for(f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    async with enqueuer:
        with pytest.raises(Unavailable, match="RabbitMQ cannot be reached"):
            await service.ready()
    await store.close()
