"""Fixtures shared by the unit tests of the service and its doors: a real ``TaskService``
over a started memory store and an enqueuer that records ids (see tests/support/service_kit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import RecordingEnqueuer, make_service


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def enqueuer() -> RecordingEnqueuer:
    return RecordingEnqueuer()


@pytest.fixture
def service(store: MemoryStore, enqueuer: RecordingEnqueuer) -> TaskService:
    return make_service(store, enqueuer)
