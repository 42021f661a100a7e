"""A repeated submit with the same idempotency key answers the task it created (issue #15):
the service's rule, and the MCP door's two paths (a plain ``submit_task`` and MCP Tasks), with
the key in ``_meta`` as a delegating opspawn's pool sends it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from mcp import Client

from agentkit import IDEMPOTENCY_META_KEY
from opspawn_mcp.config import Limits
from opspawn_mcp.errors import Conflict, InvalidInput
from opspawn_mcp.mcp_tasks import CreateTaskResult
from opspawn_mcp.principals import LOCAL, Principal
from opspawn_mcp.server import build_server
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import RecordingEnqueuer, make_service
from tests.support.tasks_client import TasksAware

KEY = "task-a:1:1"


async def test_a_repeated_submit_answers_the_first_task_and_enqueues_nothing_more(
    service: TaskService, store: MemoryStore, enqueuer: RecordingEnqueuer
) -> None:
    first = await service.submit({"goal": "echo hi"}, by=LOCAL, idempotency_key=KEY)
    again = await service.submit({"goal": "echo hi"}, by=LOCAL, idempotency_key=KEY)
    assert again.id == first.id
    assert len((await store.list_tasks()).items) == 1 and enqueuer.ids == [first.id]


async def test_a_repeated_submit_is_answered_even_at_the_callers_limit(store: MemoryStore) -> None:
    service = make_service(store)
    capped = replace(LOCAL, limits=Limits(max_in_flight=1))
    first = await service.submit({"goal": "echo hi"}, by=capped, idempotency_key=KEY)
    assert (await service.submit({"goal": "echo hi"}, by=capped, idempotency_key=KEY)).id == first.id


async def test_keys_are_per_principal(service: TaskService) -> None:
    mine = await service.submit({"goal": "echo hi"}, by=LOCAL, idempotency_key=KEY)
    theirs = await service.submit({"goal": "echo hi"}, by=Principal(name="bob"), idempotency_key=KEY)
    assert theirs.id != mine.id and theirs.principal == "bob"


async def test_the_same_key_with_another_request_is_a_conflict_naming_what_differs(
    service: TaskService,
) -> None:
    first = await service.submit({"goal": "echo hi"}, by=LOCAL, idempotency_key=KEY)
    with pytest.raises(Conflict) as caught:
        await service.submit({"goal": "echo bye", "max_steps": 3}, by=LOCAL, idempotency_key=KEY)
    message = caught.value.message
    assert f"task {first.id}" in message and "(goal, max_steps differ)" in message and KEY in message
    assert caught.value.details["fields"] == ["goal", "max_steps"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 201, 7, "nul\x00"])
async def test_a_malformed_key_is_invalid_input(service: TaskService, key: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        await service.submit({"goal": "echo hi"}, by=LOCAL, idempotency_key=key)  # type: ignore[arg-type]
    assert caught.value.details["field"] == "idempotency_key"


async def test_the_mcp_door_reads_the_key_from_meta(service: TaskService, store: MemoryStore) -> None:
    meta = {IDEMPOTENCY_META_KEY: KEY}
    async with Client(build_server(service)) as client:
        first = await client.call_tool("submit_task", {"goal": "echo hi", "wait": 0}, meta=meta)
        again = await client.call_tool("submit_task", {"goal": "echo hi", "wait": 0}, meta=meta)
        assert first.structured_content is not None and again.structured_content is not None
        assert again.structured_content["task_id"] == first.structured_content["task_id"]
        other = await client.call_tool("submit_task", {"goal": "echo bye"}, meta=meta)
        assert other.is_error and "conflict: The idempotency key" in other.content[0].text  # type: ignore[union-attr]
        bad = await client.call_tool("submit_task", {"goal": "echo hi"}, meta={IDEMPOTENCY_META_KEY: 3})
        assert bad.is_error and f"invalid_input: _meta.{IDEMPOTENCY_META_KEY}" in bad.content[0].text  # type: ignore[union-attr]
    assert len((await store.list_tasks()).items) == 1


async def test_mcp_tasks_answers_a_repeated_submit_with_the_same_task(
    service: TaskService, store: MemoryStore
) -> None:
    meta = {IDEMPOTENCY_META_KEY: KEY}
    async with Client(build_server(service), extensions=[TasksAware()]) as client:
        ids = []
        for _ in range(2):
            created = await client.session.call_tool(
                "submit_task", {"goal": "echo hi"}, meta=meta, allow_claimed=True
            )
            assert isinstance(created, CreateTaskResult), created
            ids.append(created.task_id)
        assert ids[0] == ids[1]
    assert len((await store.list_tasks()).items) == 1
