"""TaskService rules, tested once here; the doors only test their mapping of these errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from opspawn_mcp.config import Config, Limits, parse_config
from opspawn_mcp.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    RateLimited,
    TaskNotFound,
    Unavailable,
)
from opspawn_mcp.models import GOAL_MAX_CHARS, TaskEvent, TaskSpec, TaskStatus
from opspawn_mcp.principals import LOCAL, Principal
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import CountingStore, Directory, RecordingEnqueuer, make_config, make_service


class BrokenEnqueuer:
    """An enqueuer whose broker is down."""

    async def enqueue(self, task_id: str) -> None:
        raise ConnectionError("broker down")

    async def ping(self) -> None:
        raise Unavailable("RabbitMQ cannot be reached (broker down)")


async def test_submit_persists_queued_and_enqueues_the_id(
    service: TaskService, store: MemoryStore, enqueuer: RecordingEnqueuer
) -> None:
    task = await service.submit({"goal": "echo hi", "servers": ["echo", "echo"]}, by=LOCAL)
    assert task.status is TaskStatus.QUEUED
    assert enqueuer.ids == [task.id]
    stored = await store.get(task.id)
    assert stored.spec.servers == ["echo"]  # duplicates dropped
    assert stored.spec.model.profile == "default"  # resolved: the default profile, opspawn.llm
    events = await service.events(task.id, by=LOCAL)
    assert [(e.kind, e.data["status"]) for e in events] == [("state", "queued")]


async def test_submit_accepts_a_spec_model(service: TaskService) -> None:
    task = await service.submit(TaskSpec(goal="x", max_steps=3), by=LOCAL)
    assert task.spec.max_steps == 3


async def test_an_enqueue_failure_keeps_the_task_queued(store: MemoryStore) -> None:
    service = make_service(store, BrokenEnqueuer())
    task = await service.submit({"goal": "echo hi"}, by=LOCAL)
    assert (await store.get(task.id)).status is TaskStatus.QUEUED
    with pytest.raises(Unavailable, match="RabbitMQ"):
        await service.ready()  # and the server stops saying it can take work


async def test_unknown_server_is_forbidden_and_names_the_allowed_ones(service: TaskService) -> None:
    with pytest.raises(Forbidden) as info:
        await service.submit({"goal": "x", "servers": ["echo", "evil"]}, by=LOCAL)
    assert "'evil'" in info.value.message
    assert "echo, files" in info.value.message
    assert info.value.details["servers"] == ["evil"]


@pytest.mark.parametrize("goal", ["", "   \n"])
async def test_empty_goal_is_invalid(service: TaskService, goal: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await service.submit({"goal": goal}, by=LOCAL)
    assert "goal" in info.value.message


async def test_huge_goal_is_payload_too_large(service: TaskService, enqueuer: RecordingEnqueuer) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        await service.submit({"goal": "x" * (GOAL_MAX_CHARS + 1)}, by=LOCAL)
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
        ({}, "The goal is empty; say what the agent must do."),
        ({"goal": "  "}, "The goal is empty; say what the agent must do."),
    ],
)
async def test_wrong_types_are_invalid_with_the_field_named(
    service: TaskService, spec: dict[str, Any], where: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await service.submit(spec, by=LOCAL)
    assert where in info.value.message
    assert info.value.status == 422


async def test_a_spec_that_is_not_an_object_is_invalid(service: TaskService) -> None:
    with pytest.raises(InvalidInput):
        await service.submit(["goal"], by=LOCAL)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["base_url", "api_key_env", "provider", "model", "api_key"])
async def test_no_client_can_name_an_endpoint_a_model_or_a_key_variable(
    service: TaskService, field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await service.submit({"goal": "x", "model": {field: "http://127.0.0.1:9/v1"}}, by=LOCAL)
    assert info.value.details["field"] == f"model.{field}"
    assert "model.profile" in info.value.message and "default" in info.value.message


async def test_a_task_names_its_model_profile_and_tunes_only_harmless_knobs(
    store: MemoryStore, enqueuer: RecordingEnqueuer
) -> None:
    service = make_service(store, enqueuer, config=profiles_config())
    plain = await service.submit({"goal": "x", "model": {"temperature": 0.5}}, by=LOCAL)
    assert plain.spec.model.model_dump(exclude_none=True) == {"profile": "default", "temperature": 0.5}
    strong = await service.submit({"goal": "x", "model": {"profile": "strong", "max_tokens": 9}}, by=LOCAL)
    assert strong.spec.model.profile == "strong"
    with pytest.raises(Forbidden) as info:
        await service.submit({"goal": "x", "model": {"profile": "nope"}}, by=LOCAL)
    assert "default, strong" in info.value.message


async def test_get_unknown_and_empty_ids(service: TaskService) -> None:
    with pytest.raises(TaskNotFound):
        await service.get("nope", by=LOCAL)
    with pytest.raises(TaskNotFound):
        await service.get("x" * 500, by=LOCAL)
    with pytest.raises(InvalidInput):
        await service.get(" ", by=LOCAL)


async def test_list_filters_by_status_and_pages(service: TaskService) -> None:
    ids = [(await service.submit({"goal": f"g{i}"}, by=LOCAL)).id for i in range(3)]
    await service.cancel(ids[0], by=LOCAL)
    page = await service.list_tasks(limit=2, by=LOCAL)
    assert [t.id for t in page.items] == [ids[2], ids[1]]
    assert page.next_cursor
    rest = await service.list_tasks(limit=2, cursor=page.next_cursor, by=LOCAL)
    assert [t.id for t in rest.items] == [ids[0]]
    cancelled = await service.list_tasks("cancelled", by=LOCAL)
    assert [t.id for t in cancelled.items] == [ids[0]]


async def test_list_searches_goals_of_the_callers_own_tasks(service: TaskService) -> None:
    alice, bob = Principal("alice"), Principal("bob")
    mine = await service.submit({"goal": "Deploy the web app"}, by=alice)
    await service.submit({"goal": "deploy the database"}, by=bob)
    await service.submit({"goal": "write the report"}, by=alice)
    page = await service.list_tasks(goal_contains="  DEPLOY ", by=alice)
    assert [t.id for t in page.items] == [mine.id]
    assert len((await service.list_tasks(goal_contains="deploy", by=LOCAL)).items) == 2
    assert len((await service.list_tasks(goal_contains="", by=alice)).items) == 2  # blank: no filter


@pytest.mark.parametrize("text", ["x" * 201, "a\x00b"])
async def test_list_refuses_a_search_text_too_long_or_with_nul(service: TaskService, text: str) -> None:
    with pytest.raises(InvalidInput, match="search text"):
        await service.list_tasks(goal_contains=text, by=LOCAL)


@pytest.mark.parametrize(("status", "limit"), [("done", 10), (None, 0), (None, 10_000)])
async def test_list_rejects_bad_arguments(service: TaskService, status: str | None, limit: int) -> None:
    with pytest.raises(InvalidInput):
        await service.list_tasks(status, limit, by=LOCAL)


async def test_cancel_a_queued_task(service: TaskService) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    cancelled = await service.cancel(task.id, by=LOCAL)
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.finished_at is not None
    assert (await service.cancel(task.id, by=LOCAL)).status is TaskStatus.CANCELLED  # idempotent
    kinds = [(e.kind, e.data["status"]) for e in await service.events(task.id, by=LOCAL)]
    assert kinds == [("state", "queued"), ("state", "cancelled")]


async def test_cancel_a_running_task_makes_the_workers_final_transition_fail(
    service: TaskService, store: MemoryStore
) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    claimed = await store.claim(task.id, "worker-1", 30.0, 3)
    assert claimed is not None and claimed.status is TaskStatus.RUNNING
    assert (await service.cancel(task.id, by=LOCAL)).status is TaskStatus.CANCELLED
    with pytest.raises(Conflict):
        await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, owner="worker-1")


async def test_cancel_a_finished_task_is_a_conflict(service: TaskService, store: MemoryStore) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    await store.claim(task.id, "w", 30.0, 3)
    await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="ok")
    with pytest.raises(Conflict) as info:
        await service.cancel(task.id, by=LOCAL)
    assert "completed" in info.value.message


async def test_events_pages_after_a_seq(service: TaskService, store: MemoryStore) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    for i in range(3):
        await store.append_event(task.id, "progress", {"step": i + 1})
    page = await service.events(task.id, after_seq=1, limit=2, by=LOCAL)
    assert [e.seq for e in page] == [2, 3]
    with pytest.raises(InvalidInput):
        await service.events(task.id, after_seq=-1, by=LOCAL)
    with pytest.raises(TaskNotFound):
        await service.events("nope", by=LOCAL)


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
    task = await service.submit({"goal": "x"}, by=LOCAL)
    go = asyncio.Event()
    seen: list[TaskEvent] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_run_worker(store, task.id, go))
        async for event in service.watch(task.id, by=LOCAL):
            seen.append(event)
            if event.data.get("status") == "running":
                go.set()
    # The transition's own state event comes last: watchers never stop before it.
    assert [e.kind for e in seen] == ["state", "state", "progress", "final", "state"]
    assert seen[-1].data == {"status": "completed"}
    assert [e.seq for e in seen] == [1, 2, 3, 4, 5]


async def _parked(store: MemoryStore) -> None:
    """Until a watcher waits in the store (a bounded number of loop turns, not a clock)."""
    for _ in range(100_000):
        if store.changes.waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError("the watcher never parked in the store")


async def test_watch_reads_once_per_batch_of_writes_and_never_while_the_task_is_quiet(
    enqueuer: RecordingEnqueuer,
) -> None:
    """Writers wake watchers: each write costs the watcher one read, a quiet task none (the
    old loop read every 0.1 s per watcher). The default safety re-read is seconds away."""
    store = CountingStore()
    service = TaskService(make_config(), store, enqueuer, Directory())
    task = await service.submit({"goal": "x"}, by=LOCAL)
    seen: asyncio.Queue[TaskEvent] = asyncio.Queue()

    async def follow() -> None:
        async for event in service.watch(task.id, by=LOCAL):
            await seen.put(event)

    async with asyncio.TaskGroup() as tg:
        follower = tg.create_task(follow())
        assert (await seen.get()).seq == 1
        await _parked(store)
        assert store.event_reads == 1
        await asyncio.sleep(0.3)  # three of the old polls: nothing was written, nothing is read
        await store.claim(task.id, "w", 30.0, 3)  # no event, so no wakeup
        await _parked(store)
        assert store.event_reads == 1
        writes = [
            store.append_event(task.id, "state", {"status": "running"}),
            store.append_event(task.id, "final", {"result": "done"}),
        ]
        for expected_seq, write in enumerate(writes, start=2):
            await write
            assert (await seen.get()).seq == expected_seq
            await _parked(store)
            assert store.event_reads == expected_seq
        await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="done")
        assert (await seen.get()).seq == 4
    assert follower.done()
    assert store.event_reads == 4  # one read per batch: 4 writes, 4 batches, then the end


async def test_watch_after_a_seq_and_of_a_finished_task_ends(service: TaskService) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    await service.cancel(task.id, by=LOCAL)
    seen = [e.seq async for e in service.watch(task.id, after_seq=1, by=LOCAL)]
    assert seen == [2]


async def test_watch_unknown_task_raises(service: TaskService) -> None:
    with pytest.raises(TaskNotFound):
        async for _ in service.watch("nope", by=LOCAL):
            pass


async def test_wait_returns_the_finished_task_and_reports_events(
    service: TaskService, store: MemoryStore
) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    go = asyncio.Event()
    go.set()
    kinds: list[str] = []

    async def on_event(event: TaskEvent) -> None:
        kinds.append(event.kind)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(_run_worker(store, task.id, go))
        done = await service.wait(task.id, 60, on_event, by=LOCAL)
    assert done.status is TaskStatus.COMPLETED
    assert done.result == "done"
    assert kinds[-2:] == ["final", "state"]


async def test_wait_on_a_task_that_already_finished_still_reports_its_events(
    service: TaskService, store: MemoryStore
) -> None:
    """The worker may finish before the wait reads the task (submit_task's wait on a fast task):
    the caller is told the same events either way."""
    task = await service.submit({"goal": "x"}, by=LOCAL)
    go = asyncio.Event()
    go.set()
    await _run_worker(store, task.id, go)
    kinds: list[str] = []

    async def on_event(event: TaskEvent) -> None:
        kinds.append(event.kind)

    done = await service.wait(task.id, 60, on_event, by=LOCAL)
    assert done.status is TaskStatus.COMPLETED
    assert kinds[0] == "state" and kinds[-2:] == ["final", "state"]


async def test_wait_zero_returns_at_once(service: TaskService) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    assert (await service.wait(task.id, 0, by=LOCAL)).status is TaskStatus.QUEUED
    with pytest.raises(InvalidInput):
        await service.wait(task.id, -1, by=LOCAL)


async def test_list_servers_and_ready(service: TaskService, store: MemoryStore) -> None:
    assert [s.name for s in service.list_servers(by=LOCAL)] == ["echo", "files"]
    await service.ready()
    await store.close()
    with pytest.raises(Unavailable):
        await service.ready()


def profiles_config() -> Config:
    return parse_config(
        {
            "mcpServers": {
                "echo": {"command": "python", "args": ["-m", "x"]},
                "files": {"url": "http://127.0.0.1:1/mcp"},
            },
            "opspawn": {
                "store_url": "memory://",
                "llm": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                "models": {
                    "strong": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "big"}
                },
            },
        },
        environ={},
    )


ALICE = Principal("alice", servers=frozenset({"echo"}), models=("strong",))
BOB = Principal("bob")
ADMIN = Principal("root", admin=True)


@pytest.fixture
def shared(store: MemoryStore, enqueuer: RecordingEnqueuer) -> TaskService:
    return make_service(store, enqueuer, config=profiles_config())


async def test_principals_see_and_cancel_only_their_own_tasks(shared: TaskService) -> None:
    mine = await shared.submit({"goal": "alice's"}, by=ALICE)
    theirs = await shared.submit({"goal": "bob's"}, by=BOB)
    assert (mine.principal, theirs.principal) == ("alice", "bob")
    for attempt in (
        shared.get(theirs.id, by=ALICE),
        shared.cancel(theirs.id, by=ALICE),
        shared.events(theirs.id, by=ALICE),
        shared.wait(theirs.id, 1, by=ALICE),
    ):
        with pytest.raises(TaskNotFound):
            await attempt
    with pytest.raises(TaskNotFound):
        async for _ in shared.watch(theirs.id, by=ALICE):
            pass
    assert [t.id for t in (await shared.list_tasks(by=ALICE)).items] == [mine.id]
    assert {t.id for t in (await shared.list_tasks(by=ADMIN)).items} == {mine.id, theirs.id}
    assert (await shared.cancel(mine.id, by=ADMIN)).status is TaskStatus.CANCELLED


async def test_a_principal_uses_only_its_allowed_servers_and_profiles(shared: TaskService) -> None:
    task = await shared.submit({"goal": "x"}, by=ALICE)
    assert task.spec.servers == ["echo"]  # "all" means all it may use
    assert task.spec.model.profile == "strong"  # "default" is not allowed, so its first profile
    with pytest.raises(Forbidden) as servers:
        await shared.submit({"goal": "x", "servers": ["files"]}, by=ALICE)
    assert "'files'" in servers.value.message and "echo" in servers.value.message
    with pytest.raises(Forbidden):
        await shared.submit({"goal": "x", "model": {"profile": "default"}}, by=ALICE)
    assert [s.name for s in shared.list_servers(by=ALICE)] == ["echo"]
    assert (await shared.submit({"goal": "x"}, by=BOB)).spec.servers is None


async def test_tasks_in_flight_over_the_limit_are_rate_limited(shared: TaskService) -> None:
    capped = Principal("capped", limits=Limits(max_in_flight=2))
    first = await shared.submit({"goal": "1"}, by=capped)
    await shared.submit({"goal": "2"}, by=capped)
    with pytest.raises(RateLimited) as info:
        await shared.submit({"goal": "3"}, by=capped)
    assert info.value.status == 429 and info.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert info.value.retry_after_s >= 1 and "Retry in" in info.value.message
    await shared.cancel(first.id, by=capped)
    await shared.submit({"goal": "3"}, by=capped)  # a finished task frees its slot
    await shared.submit({"goal": "other"}, by=BOB)  # limits are per principal


async def test_concurrent_submits_cannot_slip_past_the_in_flight_limit(shared: TaskService) -> None:
    capped = Principal("capped", limits=Limits(max_in_flight=3))
    outcomes = await asyncio.gather(
        *(shared.submit({"goal": str(i)}, by=capped) for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 3
    assert all(isinstance(o, RateLimited) for o in outcomes if isinstance(o, BaseException))


async def test_the_submit_rate_is_a_token_bucket(store: MemoryStore, enqueuer: RecordingEnqueuer) -> None:
    now = [1000.0]
    service = TaskService(profiles_config(), store, enqueuer, Directory(), clock=lambda: now[0])
    limited = Principal("limited", limits=Limits(submits_per_minute=6, submit_burst=2))
    await service.submit({"goal": "1"}, by=limited)
    await service.submit({"goal": "2"}, by=limited)
    with pytest.raises(RateLimited) as info:
        await service.submit({"goal": "3"}, by=limited)
    assert info.value.retry_after_s == 10  # one token per 10 s
    now[0] += 10
    await service.submit({"goal": "3"}, by=limited)


async def test_budgets_default_to_the_callers_limits_and_cannot_exceed_them(shared: TaskService) -> None:
    limited = Principal("l", limits=Limits(max_task_tokens=1000, max_tool_calls=5, max_task_seconds=60))
    task = await shared.submit({"goal": "x"}, by=limited)
    assert task.spec.budget.model_dump() == {"max_llm_tokens": 1000, "max_tool_calls": 5}
    assert task.spec.timeout_s == 60
    lower = await shared.submit({"goal": "x", "budget": {"max_tool_calls": 2}, "timeout_s": 10}, by=limited)
    assert (lower.spec.budget.max_tool_calls, lower.spec.timeout_s) == (2, 10)
    for over in ({"budget": {"max_llm_tokens": 1001}}, {"budget": {"max_tool_calls": 6}}, {"timeout_s": 61}):
        with pytest.raises(InvalidInput) as info:
            await shared.submit({"goal": "x", **over}, by=limited)
        assert "over your limit" in info.value.message


@pytest.mark.parametrize(
    "spec",
    [
        {"goal": "a\x00b"},
        {"goal": "x", "system_prompt": "\x00"},
        {"goal": "x", "servers": ["echo\x00"]},
        {"goal": "x", "model": {"profile": "de\x00fault"}},
    ],
)
async def test_nul_characters_in_a_spec_are_invalid_input(service: TaskService, spec: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        await service.submit(spec, by=LOCAL)


async def test_nul_in_an_id_or_cursor_and_huge_sequence_numbers_are_invalid_input(
    service: TaskService,
) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    with pytest.raises(InvalidInput):
        await service.get("a\x00b", by=LOCAL)
    with pytest.raises(InvalidInput):
        await service.list_tasks(cursor="\x00", by=LOCAL)
    for seq in (2**31, 9999999999999999999):
        with pytest.raises(InvalidInput):
            await service.events(task.id, after_seq=seq, by=LOCAL)
