"""TaskService rules, tested once here; the doors only test their mapping of these errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from opspawn_mcp.errors import Conflict, Forbidden, InvalidInput, PayloadTooLarge, TaskNotFound, Unavailable
from opspawn_mcp.models import GOAL_MAX_CHARS, TaskEvent, TaskSpec, TaskStatus
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import RecordingEnqueuer, make_config, make_service


class BrokenEnqueuer:
    """An enqueuer whose broker is down."""

    async def enqueue(self, task_id: str) -> None:
        raise ConnectionError("broker down")

    async def ping(self) -> None:
        raise Unavailable("RabbitMQ cannot be reached (broker down)")


async def test_submit_persists_queued_and_enqueues_the_id(
    service: TaskService, store: MemoryStore, enqueuer: RecordingEnqueuer
) -> None:
    task = await service.submit({"goal": "echo hi", "servers": ["echo", "echo"]})
    assert task.status is TaskStatus.QUEUED
    assert enqueuer.ids == [task.id]
    stored = await store.get(task.id)
    assert stored.spec.servers == ["echo"]  # duplicates dropped
    assert stored.spec.model.provider == "local"  # resolved from opspawn.llm
    events = await service.events(task.id)
    assert [(e.kind, e.data["status"]) for e in events] == [("state", "queued")]


async def test_submit_accepts_a_spec_model(service: TaskService) -> None:
    task = await service.submit(TaskSpec(goal="x", max_steps=3))
    assert task.spec.max_steps == 3


async def test_an_enqueue_failure_keeps_the_task_queued(store: MemoryStore) -> None:
    service = make_service(store, BrokenEnqueuer())
    task = await service.submit({"goal": "echo hi"})
    assert (await store.get(task.id)).status is TaskStatus.QUEUED
    with pytest.raises(Unavailable, match="RabbitMQ"):
        await service.ready()  # and the server stops saying it can take work


async def test_unknown_server_is_forbidden_and_names_the_allowed_ones(service: TaskService) -> None:
    with pytest.raises(Forbidden) as info:
        await service.submit({"goal": "x", "servers": ["echo", "evil"]})
    assert "'evil'" in info.value.message
    assert "echo, files" in info.value.message
    assert info.value.details["servers"] == ["evil"]


@pytest.mark.parametrize("goal", ["", "   \n"])
async def test_empty_goal_is_invalid(service: TaskService, goal: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await service.submit({"goal": goal})
    assert "goal" in info.value.message


async def test_huge_goal_is_payload_too_large(service: TaskService, enqueuer: RecordingEnqueuer) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        await service.submit({"goal": "x" * (GOAL_MAX_CHARS + 1)})
    assert str(GOAL_MAX_CHARS) in info.value.message
    assert info.value.status == 413
    assert enqueuer.ids == []


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"goal": 5}, "goal"),
        ({"goal": "x", "max_steps": "many"}, "max_steps"),
        ({"goal": "x", "max_steps": 0}, "max_steps"),
        ({"goal": "x", "timeout_s": -1}, "timeout_s"),
        ({"goal": "x", "servers": "echo"}, "servers"),
        ({"goal": "x", "planner": "yolo"}, "planner"),
        ({"goal": "x", "colour": "red"}, "colour: unknown field"),
        ({}, "goal: Field required"),
    ],
)
async def test_wrong_types_are_invalid_with_the_field_named(
    service: TaskService, spec: dict[str, Any], where: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await service.submit(spec)
    assert where in info.value.message
    assert info.value.status == 422


async def test_a_spec_that_is_not_an_object_is_invalid(service: TaskService) -> None:
    with pytest.raises(InvalidInput):
        await service.submit(["goal"])  # type: ignore[arg-type]


async def test_openai_without_a_model_name_is_invalid(service: TaskService) -> None:
    with pytest.raises(InvalidInput) as info:
        await service.submit({"goal": "x", "model": {"provider": "openai"}})
    assert "model" in info.value.message


async def test_model_defaults_come_from_the_config(store: MemoryStore, enqueuer: RecordingEnqueuer) -> None:
    config = make_config(provider="openai", base_url="http://127.0.0.1:9/v1", model="m")
    service = make_service(store, enqueuer, config=config)
    task = await service.submit({"goal": "x", "model": {"temperature": 0.5}})
    assert task.spec.model.model_dump(exclude_none=True) == {
        "provider": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "temperature": 0.5,
    }


async def test_an_unset_api_key_variable_is_invalid_for_the_embedded_worker(service: TaskService) -> None:
    with pytest.raises(InvalidInput) as info:
        await service.submit({"goal": "x", "model": {"model": "m", "api_key_env": "NOPE_KEY"}})
    assert "NOPE_KEY" in info.value.message


async def test_get_unknown_and_empty_ids(service: TaskService) -> None:
    with pytest.raises(TaskNotFound):
        await service.get("nope")
    with pytest.raises(TaskNotFound):
        await service.get("x" * 500)
    with pytest.raises(InvalidInput):
        await service.get(" ")


async def test_list_filters_by_status_and_pages(service: TaskService) -> None:
    ids = [(await service.submit({"goal": f"g{i}"})).id for i in range(3)]
    await service.cancel(ids[0])
    page = await service.list(limit=2)
    assert [t.id for t in page.items] == [ids[2], ids[1]]
    assert page.next_cursor
    rest = await service.list(limit=2, cursor=page.next_cursor)
    assert [t.id for t in rest.items] == [ids[0]]
    cancelled = await service.list("cancelled")
    assert [t.id for t in cancelled.items] == [ids[0]]


@pytest.mark.parametrize(("status", "limit"), [("done", 10), (None, 0), (None, 10_000)])
async def test_list_rejects_bad_arguments(service: TaskService, status: str | None, limit: int) -> None:
    with pytest.raises(InvalidInput):
        await service.list(status, limit)


async def test_cancel_a_queued_task(service: TaskService) -> None:
    task = await service.submit({"goal": "x"})
    cancelled = await service.cancel(task.id)
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.finished_at is not None
    assert (await service.cancel(task.id)).status is TaskStatus.CANCELLED  # idempotent
    kinds = [(e.kind, e.data["status"]) for e in await service.events(task.id)]
    assert kinds == [("state", "queued"), ("state", "cancelled")]


async def test_cancel_a_running_task_makes_the_workers_final_transition_fail(
    service: TaskService, store: MemoryStore
) -> None:
    task = await service.submit({"goal": "x"})
    claimed = await store.claim(task.id, "worker-1", 30.0, 3)
    assert claimed is not None and claimed.status is TaskStatus.RUNNING
    assert (await service.cancel(task.id)).status is TaskStatus.CANCELLED
    with pytest.raises(Conflict):
        await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, owner="worker-1")


async def test_cancel_a_finished_task_is_a_conflict(service: TaskService, store: MemoryStore) -> None:
    task = await service.submit({"goal": "x"})
    await store.claim(task.id, "w", 30.0, 3)
    await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="ok")
    with pytest.raises(Conflict) as info:
        await service.cancel(task.id)
    assert "completed" in info.value.message


async def test_events_pages_after_a_seq(service: TaskService, store: MemoryStore) -> None:
    task = await service.submit({"goal": "x"})
    for i in range(3):
        await store.append_event(task.id, "progress", {"step": i + 1})
    page = await service.events(task.id, after_seq=1, limit=2)
    assert [e.seq for e in page] == [2, 3]
    with pytest.raises(InvalidInput):
        await service.events(task.id, after_seq=-1)
    with pytest.raises(TaskNotFound):
        await service.events("nope")


async def _run_worker(store: MemoryStore, task_id: str, go: asyncio.Event) -> None:
    """Stands in for the worker: the real store moves, driven step by step by the test."""
    await store.claim(task_id, "w", 30.0, 3)
    await store.append_event(task_id, "state", {"status": "running"})
    await go.wait()
    await store.append_event(task_id, "progress", {"step": 1})
    await store.append_event(task_id, "final", {"result": "done"})
    await store.transition(task_id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="done")


async def test_watch_follows_the_log_until_the_task_is_terminal(
    service: TaskService, store: MemoryStore
) -> None:
    task = await service.submit({"goal": "x"})
    go = asyncio.Event()
    seen: list[TaskEvent] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_run_worker(store, task.id, go))
        async for event in service.watch(task.id):
            seen.append(event)
            if event.data.get("status") == "running":
                go.set()
    # The transition's own state event comes last: watchers never stop before it.
    assert [e.kind for e in seen] == ["state", "state", "progress", "final", "state"]
    assert seen[-1].data == {"status": "completed"}
    assert [e.seq for e in seen] == [1, 2, 3, 4, 5]


async def test_watch_after_a_seq_and_of_a_finished_task_ends(service: TaskService) -> None:
    task = await service.submit({"goal": "x"})
    await service.cancel(task.id)
    seen = [e.seq async for e in service.watch(task.id, after_seq=1)]
    assert seen == [2]


async def test_watch_unknown_task_raises(service: TaskService) -> None:
    with pytest.raises(TaskNotFound):
        async for _ in service.watch("nope"):
            pass


async def test_wait_returns_the_finished_task_and_reports_events(
    service: TaskService, store: MemoryStore
) -> None:
    task = await service.submit({"goal": "x"})
    go = asyncio.Event()
    go.set()
    kinds: list[str] = []

    async def on_event(event: TaskEvent) -> None:
        kinds.append(event.kind)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(_run_worker(store, task.id, go))
        done = await service.wait(task.id, 60, on_event)
    assert done.status is TaskStatus.COMPLETED
    assert done.result == "done"
    assert kinds[-2:] == ["final", "state"]


async def test_wait_zero_returns_at_once(service: TaskService) -> None:
    task = await service.submit({"goal": "x"})
    assert (await service.wait(task.id, 0)).status is TaskStatus.QUEUED
    with pytest.raises(InvalidInput):
        await service.wait(task.id, -1)


async def test_list_servers_and_ready(service: TaskService, store: MemoryStore) -> None:
    assert [s.name for s in service.list_servers()] == ["echo", "files"]
    await service.ready()
    await store.close()
    with pytest.raises(Unavailable):
        await service.ready()


async def test_a_key_is_never_sent_to_a_base_url_the_client_chose(
    store: MemoryStore, enqueuer: RecordingEnqueuer
) -> None:
    config = make_config(
        {"K": "secret"}, provider="openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="K"
    )
    service = make_service(store, enqueuer, config=config, environ={"K": "secret"})
    own = await service.submit({"goal": "x"})
    assert own.spec.model.api_key_env == "K"
    elsewhere = await service.submit({"goal": "x", "model": {"base_url": "http://evil.example/v1"}})
    assert elsewhere.spec.model.api_key_env is None
    with pytest.raises(Forbidden) as info:
        await service.submit(
            {"goal": "x", "model": {"base_url": "http://evil.example/v1", "api_key_env": "K"}}
        )
    assert "api_key_env" in info.value.message
