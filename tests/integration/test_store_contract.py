"""One contract, three stores: every ``TaskStore`` behaves the same.

Each test runs against the memory store, SQLite in ``tmp_path`` and the real PostgreSQL
server (a fresh schema per test, dropped afterwards), so a semantic difference between the
implementations shows up as a failing parameter, not as a production surprise. The race
tests give every writer its own store instance (its own connection pool) so the database,
not a Python lock, has to arbitrate. Nothing here asserts on timing: leases that must be
expired are given a tiny TTL and then waited past, which only gets *more* true on a slow
machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from opspawn_mcp.config import StoreSettings
from opspawn_mcp.errors import Conflict, IllegalTransition, InvalidInput, TaskNotFound, Unavailable
from opspawn_mcp.models import ApprovalRequest, ExposedCall, Task, TaskSpec, TaskStatus, Usage, utcnow
from opspawn_mcp.store import JournalRow, KeyTaken, MemoryStore, TaskStore, open_store, pool_size_for
from opspawn_mcp.store.sql_schema import SCHEMA_VERSION
from tests.support.services import POSTGRES_URL, drop_schema, require_service

if TYPE_CHECKING:
    from opspawn_mcp.store.sql import SqlStore

BACKENDS = ["memory", "sqlite", "postgres"]
StoreFactory = Callable[[], Awaitable[TaskStore]]
Reopen = Callable[[], Awaitable["SqlStore"]]


def _task(status: TaskStatus = TaskStatus.QUEUED, goal: str = "say hello") -> Task:
    return Task(spec=TaskSpec(goal=goal), status=status)


@pytest.fixture(params=BACKENDS)
async def open_new(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """A factory of started stores that all see the same data (one DB file / one schema).

    The memory store cannot be shared between instances, so its factory hands back the same
    instance every time; the SQL factories open a new engine each call.
    """
    backend: str = request.param
    schema: str | None = None
    if backend == "postgres":
        require_service("postgres")
        schema = f"opspawn_test_{uuid.uuid4().hex[:12]}"
    shared = MemoryStore()

    async with _closing(schema) as opened:

        async def factory() -> TaskStore:
            if backend == "memory":
                store: TaskStore = shared
            elif backend == "sqlite":
                store = open_store(f"sqlite+aiosqlite:///{tmp_path / 'db' / 'opspawn.db'}")
            else:
                store = open_store(POSTGRES_URL, schema=schema)
            await store.start()
            opened.append(store)
            return store

        yield factory


@contextlib.asynccontextmanager
async def _closing(schema: str | None) -> AsyncIterator[list[TaskStore]]:
    """A list for every store a test opens: all closed at the end, and the PostgreSQL
    ``schema`` (when one was made) dropped."""
    opened: list[TaskStore] = []
    try:
        yield opened
    finally:
        for store in opened:
            await store.close()
        if schema is not None:
            await drop_schema(schema)


@pytest.fixture
async def store(open_new: StoreFactory) -> TaskStore:
    return await open_new()


# --- create / get / list -------------------------------------------------------------


async def test_create_then_get_round_trips(store: TaskStore) -> None:
    task = _task()
    created = await store.create(task)
    got = await store.get(task.id)
    assert got == created
    assert got.spec == task.spec
    assert got.status is TaskStatus.QUEUED
    assert got.created_at.utcoffset() == timedelta(0)
    assert abs(got.created_at - task.created_at) < timedelta(milliseconds=1)


async def test_an_idempotency_key_is_unique_per_principal(store: TaskStore) -> None:
    keyed = await store.create(Task(spec=TaskSpec(goal="g"), principal="a", idempotency_key="k:1"))
    assert keyed.idempotency_key == "k:1" and await store.get_by_key("a", "k:1") == keyed
    assert await store.get_by_key("b", "k:1") is None and await store.get_by_key("a", "k:2") is None
    with pytest.raises(KeyTaken) as caught:
        await store.create(Task(spec=TaskSpec(goal="other"), principal="a", idempotency_key="k:1"))
    assert caught.value.task == keyed and isinstance(caught.value, Conflict)
    theirs = await store.create(Task(spec=TaskSpec(goal="g"), principal="b", idempotency_key="k:1"))
    assert await store.get_by_key("b", "k:1") == theirs
    await store.create(_task())
    await store.create(_task())  # tasks without a key never clash
    assert len((await store.list_tasks()).items) == 4


async def test_concurrent_creates_with_one_key_insert_one_task(open_new: StoreFactory) -> None:
    stores = [await open_new() for _ in range(4)]

    async def create(store: TaskStore) -> str:
        try:
            return (await store.create(Task(spec=TaskSpec(goal="g"), idempotency_key="k"))).id
        except KeyTaken as taken:
            return taken.task.id

    ids = await asyncio.gather(*(create(s) for s in stores))
    assert len(set(ids)) == 1 and len((await stores[0].list_tasks()).items) == 1


async def test_get_unknown_raises_task_not_found(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        await store.get("no-such-task")


async def test_list_is_newest_first_with_cursor_pages_and_status_filter(store: TaskStore) -> None:
    base = utcnow()
    tasks = []
    for i in range(7):
        status = TaskStatus.QUEUED if i % 2 == 0 else TaskStatus.RUNNING
        task = _task(status, goal=f"goal {i}").model_copy(update={"created_at": base + timedelta(seconds=i)})
        tasks.append(await store.create(task))
    newest_first = [t.id for t in reversed(tasks)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.list_tasks(limit=3, cursor=cursor)
        pages += 1
        seen += [t.id for t in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == newest_first
    assert pages == 3

    queued = await store.list_tasks(status=TaskStatus.QUEUED, limit=2)
    assert [t.id for t in queued.items] == [tasks[6].id, tasks[4].id]
    assert queued.next_cursor is not None
    rest = await store.list_tasks(status=TaskStatus.QUEUED, limit=2, cursor=queued.next_cursor)
    assert [t.id for t in rest.items] == [tasks[2].id, tasks[0].id]
    assert rest.next_cursor is None
    assert (await store.list_tasks(status=TaskStatus.CANCELLED)).items == []


async def test_list_ties_on_created_at_are_broken_by_id(store: TaskStore) -> None:
    same = utcnow()
    ids = []
    for _ in range(5):
        ids.append((await store.create(_task().model_copy(update={"created_at": same}))).id)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_tasks(limit=2, cursor=cursor)
        seen += [t.id for t in page.items]
        if (cursor := page.next_cursor) is None:
            break
    assert seen == sorted(ids, reverse=True)


async def test_list_finds_goals_containing_a_text_ignoring_case_with_wildcards_literal(
    store: TaskStore,
) -> None:
    goals = ["Echo HELLO", "say hello world", "100% sure", "100 percent", "snake_case", "snakeXcase"]
    ids = {goal: (await store.create(_task(goal=goal))).id for goal in goals}

    async def found(text: str) -> set[str]:
        return {t.id for t in (await store.list_tasks(goal_contains=text, limit=50)).items}

    assert await found("hello") == {ids["Echo HELLO"], ids["say hello world"]}
    assert await found("100%") == {ids["100% sure"]}
    assert await found("e_c") == {ids["snake_case"]}
    assert await found("nowhere") == set()
    queued_only = await store.list_tasks(TaskStatus.RUNNING, goal_contains="hello")
    assert queued_only.items == []


async def test_list_rejects_a_forged_cursor(store: TaskStore) -> None:
    with pytest.raises(InvalidInput):
        await store.list_tasks(cursor="not-a-cursor!")


# --- transitions -------------------------------------------------------------------------

ALL_PAIRS = list(itertools.product(TaskStatus, TaskStatus))


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
async def test_transition_follows_can_become(store: TaskStore, current: TaskStatus, new: TaskStatus) -> None:
    task = await store.create(_task(current))
    if current.can_become(new):
        approval = _request() if new is TaskStatus.INPUT_REQUIRED else None
        moved = await store.transition(
            task.id, {current}, new, result="r", error="e", usage=Usage(input_tokens=3), approval=approval
        )
        assert moved.status is new
        assert moved.approval == approval
        assert (moved.started_at is not None) == (new is TaskStatus.RUNNING)
        assert (moved.finished_at is not None) == new.terminal
        assert moved.result == "r" and moved.error == "e" and moved.usage.input_tokens == 3
        assert await store.get(task.id) == moved
    else:
        with pytest.raises(IllegalTransition):
            await store.transition(task.id, {current}, new)
        assert (await store.get(task.id)).status is current


async def test_a_completed_tasks_warning_is_stored_with_it(store: TaskStore) -> None:
    task = await store.create(_task(TaskStatus.RUNNING))
    warning = "the agent finished without a successful tool result (last tool error: t__fail: disk full)"
    done = await store.transition(
        task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="ok", warning=warning
    )
    assert done.warning == warning and (await store.get(task.id)).warning == warning
    assert [t.warning for t in (await store.list_tasks()).items] == [warning]
    clean = await store.create(_task(TaskStatus.RUNNING))
    assert (await store.transition(clean.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED)).warning is None


async def test_transition_needs_the_current_status_in_expected(store: TaskStore) -> None:
    task = await store.create(_task(TaskStatus.QUEUED))
    with pytest.raises(IllegalTransition):
        await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED)
    # Listing an illegal source in ``expected`` does not make the move legal.
    done = await store.create(_task(TaskStatus.COMPLETED))
    with pytest.raises(IllegalTransition):
        await store.transition(done.id, {TaskStatus.COMPLETED, TaskStatus.RUNNING}, TaskStatus.FAILED)
    assert (await store.get(done.id)).status is TaskStatus.COMPLETED


async def test_transition_unknown_task_raises_not_found(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        await store.transition("missing", {TaskStatus.QUEUED}, TaskStatus.RUNNING)
    with pytest.raises(TaskNotFound):
        await store.transition("missing", {TaskStatus.COMPLETED}, TaskStatus.RUNNING)


async def test_started_and_finished_at_are_set_on_the_way(store: TaskStore) -> None:
    task = await store.create(_task())
    assert task.started_at is None and task.finished_at is None
    running = await store.transition(task.id, {TaskStatus.QUEUED}, TaskStatus.RUNNING)
    assert running.started_at is not None and running.finished_at is None
    done = await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="42")
    assert done.finished_at is not None and done.finished_at >= running.started_at
    assert done.started_at == running.started_at
    assert done.finished_at.utcoffset() == timedelta(0)


async def test_owner_guarded_transition(store: TaskStore) -> None:
    task = await store.create(_task())
    claimed = await store.claim(task.id, "worker-a", ttl_s=3600, max_attempts=3)
    assert claimed is not None
    with pytest.raises(IllegalTransition):
        await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, owner="worker-b")
    assert (await store.get(task.id)).status is TaskStatus.RUNNING
    done = await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, owner="worker-a")
    assert done.status is TaskStatus.COMPLETED
    assert done.lease_owner is None and done.lease_expires_at is None


# --- leases ------------------------------------------------------------------------------


async def _expire(store: TaskStore, task_id: str, owner: str) -> None:
    """Claim with a lease that is over once we have slept past it (slower only helps)."""
    assert await store.claim(task_id, owner, ttl_s=0.001, max_attempts=10) is not None
    await asyncio.sleep(0.05)


async def test_claim_queued_task(store: TaskStore) -> None:
    task = await store.create(_task())
    claimed = await store.claim(task.id, "w1", ttl_s=60, max_attempts=3)
    assert claimed is not None
    assert claimed.status is TaskStatus.RUNNING
    assert claimed.lease_owner == "w1"
    assert claimed.attempts == 1
    assert claimed.started_at is not None
    assert claimed.lease_expires_at is not None and claimed.lease_expires_at > claimed.started_at
    assert await store.get(task.id) == claimed


async def test_claim_refuses_live_lease_and_terminal_tasks(store: TaskStore) -> None:
    task = await store.create(_task())
    assert await store.claim(task.id, "w1", ttl_s=3600, max_attempts=3) is not None
    assert await store.claim(task.id, "w2", ttl_s=3600, max_attempts=3) is None
    assert (await store.get(task.id)).lease_owner == "w1"
    done = await store.create(_task(TaskStatus.COMPLETED))
    assert await store.claim(done.id, "w1", ttl_s=60, max_attempts=3) is None


async def test_claim_unknown_task_raises_not_found(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        await store.claim("missing", "w1", ttl_s=60, max_attempts=3)


async def test_expired_lease_is_reclaimed_with_another_attempt(store: TaskStore) -> None:
    task = await store.create(_task())
    await _expire(store, task.id, "dead-worker")
    again = await store.claim(task.id, "w2", ttl_s=3600, max_attempts=3)
    assert again is not None
    assert again.lease_owner == "w2" and again.attempts == 2
    assert not await store.renew(task.id, "dead-worker", ttl_s=60)


async def test_claim_stops_at_max_attempts(store: TaskStore) -> None:
    task = await store.create(_task())
    await _expire(store, task.id, "w1")
    assert await store.claim(task.id, "w2", ttl_s=60, max_attempts=1) is None
    current = await store.get(task.id)
    assert current.attempts == 1 and current.lease_owner == "w1"
    tired = await store.create(_task().model_copy(update={"attempts": 3}))
    assert await store.claim(tired.id, "w1", ttl_s=60, max_attempts=3) is None


async def test_renew_by_owner_only(store: TaskStore) -> None:
    task = await store.create(_task())
    first = await store.claim(task.id, "w1", ttl_s=1, max_attempts=3)
    assert first is not None and first.lease_expires_at is not None
    assert await store.renew(task.id, "w1", ttl_s=3600)
    renewed = await store.get(task.id)
    assert renewed.lease_expires_at is not None and renewed.lease_expires_at > first.lease_expires_at
    assert not await store.renew(task.id, "stranger", ttl_s=3600)
    assert (await store.get(task.id)).lease_owner == "w1"
    assert not await store.renew("missing", "w1", ttl_s=60)
    await store.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, owner="w1")
    assert not await store.renew(task.id, "w1", ttl_s=60)


async def test_expired_lists_running_tasks_past_their_lease(store: TaskStore) -> None:
    live = await store.create(_task())
    await store.claim(live.id, "w1", ttl_s=3600, max_attempts=3)
    queued = await store.create(_task())
    gone = await store.create(_task())
    await _expire(store, gone.id, "w2")

    assert [t.id for t in await store.expired()] == [gone.id]
    later = await store.expired(now=utcnow() + timedelta(hours=2))
    assert {t.id for t in later} == {live.id, gone.id}
    assert queued.id not in {t.id for t in later}
    assert len(await store.expired(now=utcnow() + timedelta(hours=2), limit=1)) == 1


async def test_record_progress(store: TaskStore) -> None:
    task = await store.create(_task())
    await store.claim(task.id, "w1", ttl_s=60, max_attempts=3)
    await store.record_progress(task.id, 4, Usage(input_tokens=100, output_tokens=20))
    got = await store.get(task.id)
    assert got.steps == 4
    assert got.usage == Usage(input_tokens=100, output_tokens=20)
    with pytest.raises(TaskNotFound):
        await store.record_progress("missing", 1, Usage())


# --- events ------------------------------------------------------------------------------


async def test_events_in_order_with_after_seq(store: TaskStore) -> None:
    task = await store.create(_task())
    for i in range(5):
        event = await store.append_event(task.id, "progress", {"step": i})
        assert event.seq == i + 2  # seq 1 is the queued event create wrote
        assert event.time.utcoffset() == timedelta(0)
    events = await store.events(task.id)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.data.get("step") for e in events] == [None, 0, 1, 2, 3, 4]
    assert [e.seq for e in await store.events(task.id, after_seq=4)] == [5, 6]
    assert [e.seq for e in await store.events(task.id, after_seq=1, limit=2)] == [2, 3]
    assert await store.events(task.id, after_seq=6) == []
    other = await store.create(_task())
    assert (await store.append_event(other.id, "log", {"line": "x"})).seq == 2


async def test_create_writes_the_first_state_event_with_the_task(store: TaskStore) -> None:
    """The queued event is part of create, so no reader sees a task whose log is empty."""
    task = await store.create(_task())
    events = await store.events(task.id)
    assert [(e.seq, e.kind, e.data) for e in events] == [(1, "state", {"status": "queued"})]
    done = await store.create(_task(TaskStatus.COMPLETED))
    assert [e.data for e in await store.events(done.id)] == [{"status": "completed"}]
    with pytest.raises(Conflict):
        await store.create(task)
    assert len(await store.events(task.id)) == 1


async def test_events_for_unknown_task_and_kind(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        await store.append_event("missing", "log", {})
    task = await store.create(_task())
    with pytest.raises(InvalidInput):
        await store.append_event(task.id, "not-a-kind", {})


async def test_a_transition_writes_its_state_event_with_it(store: TaskStore) -> None:
    task = await store.create(_task())
    await store.transition(task.id, [TaskStatus.QUEUED], TaskStatus.CANCELLED, error="by client")
    events = await store.events(task.id)
    assert [(e.seq, e.kind, e.data) for e in events] == [
        (1, "state", {"status": "queued"}),
        (2, "state", {"status": "cancelled", "reason": "by client"}),
    ]


async def test_a_finished_tasks_log_takes_only_state_events(store: TaskStore) -> None:
    task = await store.create(_task())
    await store.transition(task.id, [TaskStatus.QUEUED], TaskStatus.CANCELLED)
    with pytest.raises(Conflict):
        await store.append_event(task.id, "llm", {"late": True})
    await store.append_event(task.id, "state", {"status": "cancelled", "note": "state events still land"})
    assert [(e.seq, e.kind) for e in await store.events(task.id)] == [
        (1, "state"),
        (2, "state"),
        (3, "state"),
    ]


# --- record: one agent event, one transaction ----------------------------------------------


async def _running(store: TaskStore, owner: str = "w1") -> Task:
    task = await store.create(_task())
    claimed = await store.claim(task.id, owner, ttl_s=3600, max_attempts=3)
    assert claimed is not None
    return claimed


async def test_record_writes_event_progress_and_journal_entry_together(store: TaskStore) -> None:
    task = await _running(store)
    entry = JournalRow(kind="llm", ordinal=0, step=1, attempt=1, data={"text": "thinking", "usage": [3, 4]})
    event = await store.record(
        task.id,
        "w1",
        "llm",
        {"step": 1},
        steps=1,
        usage=Usage(input_tokens=3, output_tokens=4),
        entries=[entry],
    )
    assert event is not None
    assert (event.seq, event.kind, event.data) == (2, "llm", {"step": 1})
    assert event.time.utcoffset() == timedelta(0)
    plain = await store.record(task.id, "w1", "progress", {"step": 2}, steps=2, usage=Usage(input_tokens=9))
    assert plain is not None and plain.seq == 3
    got = await store.get(task.id)
    assert (got.steps, got.usage) == (2, Usage(input_tokens=9))
    assert [(e.seq, e.kind) for e in await store.events(task.id)] == [
        (1, "state"),
        (2, "llm"),
        (3, "progress"),
    ]
    assert await store.journal(task.id) == [entry]


async def test_record_writes_nothing_once_the_task_is_not_ours(store: TaskStore) -> None:
    """Cancelled meanwhile, taken over by another worker, finished, or never started: None,
    and neither the log, the progress nor the journal changes."""
    cancelled = await _running(store)
    await store.transition(cancelled.id, {TaskStatus.RUNNING}, TaskStatus.CANCELLED)
    taken = await _running(store, owner="w2")
    finished = await _running(store)
    await store.transition(finished.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, owner="w1")
    queued = await store.create(_task())
    for task in (cancelled, taken, finished, queued):
        before = (await store.get(task.id), await store.events(task.id))
        entry = JournalRow(kind="tool_started", ordinal=0, step=1, data={"tool": "t"})
        recorded = await store.record(
            task.id, "w1", "tool_call", {"step": 1}, steps=7, usage=Usage(input_tokens=50), entries=[entry]
        )
        assert recorded is None, task.id
        assert (await store.get(task.id), await store.events(task.id)) == before
        assert await store.journal(task.id) == []


async def test_record_unknown_task_or_kind_is_refused(store: TaskStore) -> None:
    with pytest.raises(TaskNotFound):
        await store.record("missing", "w1", "llm", {}, steps=0, usage=Usage())
    task = await _running(store)
    with pytest.raises(InvalidInput):
        await store.record(task.id, "w1", "not-a-kind", {}, steps=0, usage=Usage())
    assert len(await store.events(task.id)) == 1


async def test_journal_round_trips_in_ordinal_order(store: TaskStore) -> None:
    task = await _running(store)
    written = [
        JournalRow(kind="llm", ordinal=0, step=1, attempt=1, data={"tool_calls": [{"name": "a"}]}),
        JournalRow(kind="tool_started", ordinal=1, step=1, attempt=1, data={"call": 0}),
        JournalRow(kind="tool_finished", ordinal=1, step=1, attempt=2, data={"result": "ok"}),
        JournalRow(kind="llm", ordinal=2, step=2, attempt=2, data={"text": "done"}),
    ]
    # Written out of order on purpose: the read is ordered by ordinal, then by kind within it.
    for entry in (written[3], written[2], written[0], written[1]):
        assert await store.record(task.id, "w1", "log", {}, steps=entry.step, usage=Usage(), entries=[entry])
    assert await store.journal(task.id) == written
    other = await _running(store)
    assert await store.journal(other.id) == []
    with pytest.raises(TaskNotFound):
        await store.journal("missing")


async def test_a_duplicate_journal_entry_is_a_conflict_and_writes_nothing(store: TaskStore) -> None:
    task = await _running(store)
    first = JournalRow(kind="tool_finished", ordinal=3, step=2, attempt=1, data={"result": "sent"})
    assert await store.record(task.id, "w1", "tool_result", {}, steps=2, usage=Usage(), entries=[first])
    before = (await store.get(task.id), await store.events(task.id))
    replay = first.model_copy(update={"attempt": 2, "data": {"result": "sent twice"}})
    with pytest.raises(Conflict):
        await store.record(
            task.id, "w1", "tool_result", {}, steps=5, usage=Usage(input_tokens=1), entries=[replay]
        )
    assert (await store.get(task.id), await store.events(task.id)) == before
    assert await store.journal(task.id) == [first]
    # The same ordinal under another kind is another entry (a call's start and its finish).
    started = JournalRow(kind="tool_started", ordinal=3, step=2, attempt=1)
    assert await store.record(task.id, "w1", "tool_call", {}, steps=2, usage=Usage(), entries=[started])
    assert await store.journal(task.id) == [started, first]


async def test_record_writes_held_entries_with_the_next_event(store: TaskStore) -> None:
    """A planner's model call has no event of its own; it rides along with the next one."""
    task = await _running(store)
    plan = JournalRow(kind="llm", ordinal=1, step=0, attempt=1, data={"content": "plan"})
    first = JournalRow(kind="llm", ordinal=2, step=1, attempt=1, data={"content": "act"})
    event = await store.record(task.id, "w1", "llm", {}, steps=1, usage=Usage(), entries=[plan, first])
    assert event is not None and event.seq == 2
    assert await store.journal(task.id) == [plan, first]
    again = JournalRow(kind="llm", ordinal=3, step=2, attempt=1)
    with pytest.raises(Conflict):  # one stale entry in the batch refuses the whole event
        await store.record(task.id, "w1", "llm", {}, steps=2, usage=Usage(), entries=[plan, again])
    with pytest.raises(Conflict):  # and so does a batch that repeats itself
        await store.record(task.id, "w1", "llm", {}, steps=2, usage=Usage(), entries=[again, again])
    assert await store.journal(task.id) == [plan, first]
    assert [e.seq for e in await store.events(task.id)] == [1, 2]
    assert (await store.get(task.id)).steps == 1


async def test_concurrent_recorders_get_gapless_unique_seqs(open_new: StoreFactory) -> None:
    """Twenty writers (each its own pool) recording into one task, mixed with plain appends:
    ``last_seq`` hands out every number exactly once."""
    stores = [await open_new() for _ in range(WRITERS)]
    task = await _running(stores[0])
    per_writer = 5

    async def write(i: int) -> list[int]:
        seqs = []
        for n in range(per_writer):
            if n == 2:
                seqs.append((await stores[i].append_event(task.id, "log", {"writer": i})).seq)
                continue
            entry = JournalRow(kind="llm", ordinal=i * per_writer + n, step=n, attempt=1)
            event = await stores[i].record(
                task.id, "w1", "llm", {"writer": i, "n": n}, steps=n, usage=Usage(), entries=[entry]
            )
            assert event is not None
            seqs.append(event.seq)
        return seqs

    results = await asyncio.gather(*(write(i) for i in range(WRITERS)))
    total = WRITERS * per_writer
    assert sorted(s for r in results for s in r) == list(range(2, total + 2))
    assert [e.seq for e in await stores[0].events(task.id)] == list(range(1, total + 2))
    assert len(await stores[0].journal(task.id)) == WRITERS * (per_writer - 1)
    for r in results:
        assert r == sorted(r)


# --- batched heartbeats ------------------------------------------------------------------


async def test_renew_many_renews_what_is_still_held_in_one_call(store: TaskStore) -> None:
    mine = await _running(store, owner="p/1")
    also_mine = await _running(store, owner="p/2")
    taken = await _running(store, owner="other/1")
    cancelled = await _running(store, owner="p/3")
    await store.transition(cancelled.id, {TaskStatus.RUNNING}, TaskStatus.CANCELLED)
    queued = await store.create(_task())
    leases = {
        mine.id: "p/1",
        also_mine.id: "p/2",
        taken.id: "p/4",  # we think it is ours; another worker took it over
        cancelled.id: "p/3",
        queued.id: "p/5",
        "missing": "p/6",
    }
    held = await store.renew_many(leases, ttl_s=7200)
    assert held == {mine.id, also_mine.id}
    for task in (mine, also_mine):
        renewed = await store.get(task.id)
        assert renewed.lease_expires_at is not None and task.lease_expires_at is not None
        assert renewed.lease_expires_at > task.lease_expires_at
    assert await store.get(taken.id) == taken
    assert (await store.get(cancelled.id)).lease_owner is None
    assert await store.renew_many({}, ttl_s=60) == set()
    with pytest.raises(InvalidInput):
        await store.renew_many({mine.id: "p/1"}, ttl_s=0)


async def test_renew_many_keeps_an_expired_lease_nobody_took(store: TaskStore) -> None:
    """Like ``renew``: a lapsed lease is still the owner's until someone claims the task."""
    task = await store.create(_task())
    await _expire(store, task.id, "slow")
    assert await store.renew_many({task.id: "slow"}, ttl_s=3600) == {task.id}
    assert await store.expired() == []


async def test_renew_many_beyond_one_statement(store: TaskStore) -> None:
    from opspawn_mcp.store.sql import RENEW_CHUNK

    count = RENEW_CHUNK + 5
    tasks = [await _running(store, owner=f"p/{i}") for i in range(count)]
    held = await store.renew_many({t.id: f"p/{i}" for i, t in enumerate(tasks)}, ttl_s=3600)
    assert held == {t.id for t in tasks}


# --- schema and restarts ----------------------------------------------------------------


async def test_start_is_idempotent_and_reopen_keeps_data(open_new: StoreFactory) -> None:
    first = await open_new()
    await first.start()
    task = await first.create(_task())
    await first.append_event(task.id, "log", {"line": "kept"})
    second = await open_new()
    await second.start()
    assert (await second.get(task.id)).id == task.id
    assert [e.data for e in await second.events(task.id)] == [{"status": "queued"}, {"line": "kept"}]
    await second.ping()


async def test_schema_version_is_recorded(store: TaskStore) -> None:
    if isinstance(store, MemoryStore):
        return  # nothing to migrate; the contract part (idempotent start) is tested above
    from opspawn_mcp.store.sql import SqlStore

    assert isinstance(store, SqlStore)
    assert await store.schema_version() == SCHEMA_VERSION
    await store.start()
    assert await store.schema_version() == SCHEMA_VERSION


async def test_the_outbox_lists_queued_tasks_no_broker_confirmed(store: TaskStore) -> None:
    later = utcnow() + timedelta(seconds=60)
    sent, unsent, done = [await store.create(_task()) for _ in range(3)]
    await store.mark_enqueued(sent.id)
    await store.transition(done.id, {TaskStatus.QUEUED}, TaskStatus.CANCELLED)
    assert await store.unenqueued(later) == [unsent.id]
    assert await store.unenqueued(utcnow() - timedelta(seconds=60)) == []  # too young to chase
    # Back in the queue (a lost lease, a shutdown): it needs a new confirmed message.
    assert await store.claim(sent.id, "w1", 30, 3) is not None
    await store.transition(sent.id, {TaskStatus.RUNNING}, TaskStatus.QUEUED, owner="w1")
    assert set(await store.unenqueued(later)) == {sent.id, unsent.id}
    await store.mark_enqueued(done.id)  # a finished task is never marked, nor listed
    assert done.id not in await store.unenqueued(later)


async def test_tasks_belong_to_principals(store: TaskStore) -> None:
    alice = [await store.create(Task(spec=TaskSpec(goal=f"a{i}"), principal="alice")) for i in range(3)]
    bob = await store.create(Task(spec=TaskSpec(goal="b"), principal="bob"))
    assert (await store.get(bob.id)).principal == "bob"
    page = await store.list_tasks(limit=2, principal="alice")
    assert [t.id for t in page.items] == [alice[2].id, alice[1].id]
    rest = await store.list_tasks(limit=2, cursor=page.next_cursor, principal="alice")
    assert [t.id for t in rest.items] == [alice[0].id] and rest.next_cursor is None
    assert len((await store.list_tasks(principal=None)).items) == 4
    await store.transition(alice[0].id, {TaskStatus.QUEUED}, TaskStatus.CANCELLED)
    assert (await store.count_active("alice"), await store.count_active("bob")) == (2, 1)
    assert await store.count_active("nobody") == 0


async def test_count_by_status_counts_every_principals_tasks_and_names_every_status(store: TaskStore) -> None:
    assert await store.count_by_status() == dict.fromkeys(TaskStatus, 0)
    queued = [await store.create(Task(spec=TaskSpec(goal=f"q{i}"), principal=f"p{i}")) for i in range(3)]
    assert await store.claim(queued[0].id, "w1", 30, 3) is not None
    await store.transition(queued[1].id, {TaskStatus.QUEUED}, TaskStatus.CANCELLED)
    counts = await store.count_by_status()
    assert counts == {
        **dict.fromkeys(TaskStatus, 0),
        TaskStatus.QUEUED: 1,
        TaskStatus.RUNNING: 1,
        TaskStatus.CANCELLED: 1,
    }


async def test_a_value_postgres_cannot_hold_is_invalid_input_not_an_outage() -> None:
    """NUL in text or JSON: PostgreSQL refuses it with a data error, which is the request's
    fault (422), not the database's (503). The service refuses NUL before it gets here; this
    is the store's own guard for any caller that does not."""
    require_service("postgres")
    schema = f"opspawn_test_{uuid.uuid4().hex[:12]}"
    store = open_store(POSTGRES_URL, schema=schema)
    await store.start()
    try:
        task = await store.create(_task())
        with pytest.raises(InvalidInput):
            await store.append_event(task.id, "log", {"line": "a\x00b"})
        with pytest.raises(InvalidInput):
            await store.create(Task(spec=TaskSpec.model_construct(goal="a\x00b")))
        await store.ping()
    finally:
        await store.close()
        await drop_schema(schema)


@contextlib.asynccontextmanager
async def _old_database(backend: str, tmp_path: Path) -> AsyncIterator[tuple[SqlStore, Reopen]]:
    """A started SQL store whose schema the test rolls back by hand (white-box, through its
    ``_tx()``), and a factory of stores reopened on it (migrating it again); all of them are
    closed, and the PostgreSQL schema dropped, afterwards."""
    from opspawn_mcp.store.sql import SqlStore

    schema = f"opspawn_test_{uuid.uuid4().hex[:12]}" if backend == "postgres" else None
    if schema is not None:
        require_service("postgres")
    url = POSTGRES_URL if schema is not None else f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    async with _closing(schema) as opened:
        opened.append(first := open_store(url, schema=schema))
        assert isinstance(first, SqlStore)
        await first.start()

        async def reopen() -> SqlStore:
            await first.close()
            opened.append(again := open_store(url, schema=schema))
            assert isinstance(again, SqlStore)
            await again.start()
            assert await again.schema_version() == SCHEMA_VERSION
            return again

        yield first, reopen


@contextlib.asynccontextmanager
async def _downgraded(backend: str, tmp_path: Path, *statements: str) -> AsyncIterator[Reopen]:
    """``_old_database`` rolled back by ``statements``."""
    from sqlalchemy import text

    async with _old_database(backend, tmp_path) as (first, reopen):
        async with first._tx() as conn:
            for statement in statements:
                await conn.execute(text(statement))
        yield reopen


async def test_migration_2_gives_old_tasks_a_principal_and_a_model_profile(tmp_path: Path) -> None:
    """A database written by the first schema (model settings with endpoints, no principals)."""
    from sqlalchemy import text

    legacy = {"goal": "old", "model": {"provider": "openai", "base_url": "http://x/v1", "temperature": 0.2}}
    async with _old_database("sqlite", tmp_path) as (store, reopen):
        async with store._tx() as conn:  # white-box: rebuild the version-1 shape by hand
            await conn.execute(text("DROP INDEX ix_tasks_principal_created"))
            await conn.execute(text("DROP INDEX ix_tasks_principal_status"))
            await conn.execute(text("DROP INDEX ux_tasks_principal_key"))
            await conn.execute(text("ALTER TABLE tasks DROP COLUMN idempotency_key"))
            await conn.execute(text("ALTER TABLE tasks DROP COLUMN principal"))
            await conn.execute(text("DELETE FROM schema_version WHERE version > 1"))
            await conn.execute(
                text(
                    "INSERT INTO tasks (id, status, spec, usage, steps, attempts, created_at) "
                    "VALUES ('t1', 'queued', :spec, '{}', 0, 0, '2026-01-01 00:00:00')"
                ),
                {"spec": json.dumps(legacy)},
            )
        again = await reopen()
        task = await again.get("t1")
        assert task.principal == "local"
        assert task.spec.model.model_dump(exclude_none=True) == {"profile": "default", "temperature": 0.2}
        assert await again.count_active("local") == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_migration_3_numbers_old_logs_from_their_max_seq_and_adds_the_journal(
    backend: str, tmp_path: Path
) -> None:
    """A database written by schema version 2: events but no ``last_seq``, no journal table."""
    from sqlalchemy import text

    async with _old_database(backend, tmp_path) as (store, reopen):
        async with store._tx() as conn:  # white-box: rebuild the version-2 shape by hand
            await conn.execute(text("DROP TABLE task_journal"))
            await conn.execute(text("ALTER TABLE tasks DROP COLUMN last_seq"))
            await conn.execute(text("DELETE FROM schema_version WHERE version > 2"))
            for task_id, events in (("old", 3), ("quiet", 0)):
                await conn.execute(
                    text(
                        "INSERT INTO tasks (id, status, spec, usage, steps, attempts, created_at, principal) "
                        "VALUES (:id, 'running', :spec, '{}', 0, 1, '2026-01-01 00:00:00', 'local')"
                    ),
                    {"id": task_id, "spec": json.dumps({"goal": "old"})},
                )
                for seq in range(1, events + 1):
                    await conn.execute(
                        text(
                            "INSERT INTO task_events (task_id, seq, time, kind, data) "
                            "VALUES (:id, :seq, '2026-01-01 00:00:00', 'log', :data)"
                        ),
                        {"id": task_id, "seq": seq, "data": json.dumps({"n": seq})},
                    )
        again = await reopen()
        assert (await again.append_event("old", "log", {"n": 4})).seq == 4
        assert (await again.append_event("quiet", "log", {"n": 1})).seq == 1
        assert [e.seq for e in await again.events("old")] == [1, 2, 3, 4]
        assert await again.journal("old") == []
        entry = JournalRow(kind="llm", ordinal=0, step=1, attempt=1)
        async with again._tx() as conn:  # a version-2 task has no lease: give it one
            await conn.execute(text("UPDATE tasks SET lease_owner = 'w' WHERE id = 'old'"))
        event = await again.record("old", "w", "llm", {}, steps=1, usage=Usage(), entries=[entry])
        assert event is not None and event.seq == 5
        assert await again.journal("old") == [entry]


# --- approvals ---------------------------------------------------------------------------


def _request(ordinal: int = 2, expires_in_s: float = 3600.0) -> ApprovalRequest:
    now = utcnow()
    return ApprovalRequest(
        id=f"req-{ordinal}",
        server="files",
        tool="delete_file",
        arguments={"path": "/tmp/x"},
        message="The agent wants to call delete_file.",
        requested_at=now,
        expires_at=now + timedelta(seconds=expires_in_s),
        tool_call=ordinal,
        step=1,
    )


async def _paused(store: TaskStore, request: ApprovalRequest) -> Task:
    task = await store.create(_task())
    assert await store.claim(task.id, "w1", ttl_s=3600, max_attempts=3) is not None
    held = JournalRow(kind="llm", ordinal=1, step=1, attempt=1, data={"tool_calls": [{"name": "x"}]})
    return await store.transition(
        task.id,
        {TaskStatus.RUNNING},
        TaskStatus.INPUT_REQUIRED,
        owner="w1",
        approval=request,
        event=("input_required", request.model_dump(mode="json")),
        entries=[held],
    )


async def test_pausing_writes_request_event_journal_and_state_in_one_transition(store: TaskStore) -> None:
    request = _request()
    paused = await _paused(store, request)

    got = await store.get(paused.id)
    assert got == paused
    assert got.status is TaskStatus.INPUT_REQUIRED and got.approval == request
    assert (got.approval.tool_call, got.approval.step) == (2, 1)  # the internal journal key survives
    assert got.lease_owner is None and got.lease_expires_at is None
    assert got.attempts == 0  # a pause is not a failed attempt
    kinds = [(e.kind, e.data.get("status")) for e in await store.events(paused.id)]
    assert kinds[-2:] == [("input_required", None), ("state", "input_required")]
    assert (await store.events(paused.id))[-2].data["id"] == "req-2"
    assert [r.kind for r in await store.journal(paused.id)] == ["llm"]
    assert [t.id for t in (await store.list_tasks(TaskStatus.INPUT_REQUIRED)).items] == [paused.id]
    assert await store.claim(paused.id, "w2", ttl_s=60, max_attempts=3) is None


async def test_answering_queues_the_task_with_its_journal_entry_and_clears_the_request(
    store: TaskStore,
) -> None:
    paused = await _paused(store, _request())
    answer = JournalRow(kind="approval", ordinal=2, step=1, attempt=0, data={"approved": True})

    queued = await store.transition(
        paused.id,
        {TaskStatus.INPUT_REQUIRED},
        TaskStatus.QUEUED,
        event=("input_answered", {"request_id": "req-2", "approve": True}),
        entries=[answer],
    )

    assert queued.status is TaskStatus.QUEUED and queued.approval is None
    assert await store.get(paused.id) == queued
    assert paused.id in await store.unenqueued(utcnow() + timedelta(seconds=1))
    assert [e.kind for e in await store.events(paused.id)][-2:] == ["input_answered", "state"]
    assert [r.kind for r in await store.journal(paused.id)] == ["llm", "approval"]
    resumed = await store.claim(paused.id, "w2", ttl_s=60, max_attempts=1)
    assert resumed is not None and resumed.attempts == 1


async def test_a_second_answer_to_one_call_is_a_conflict_and_writes_nothing(store: TaskStore) -> None:
    paused = await _paused(store, _request())
    answer = JournalRow(kind="approval", ordinal=2, step=1, data={"approved": False})
    await store.transition(paused.id, {TaskStatus.INPUT_REQUIRED}, TaskStatus.QUEUED, entries=[answer])
    assert await store.claim(paused.id, "w2", ttl_s=3600, max_attempts=3) is not None
    await store.transition(
        paused.id, {TaskStatus.RUNNING}, TaskStatus.INPUT_REQUIRED, owner="w2", approval=_request()
    )
    before = await store.events(paused.id)

    with pytest.raises(Conflict):
        await store.transition(
            paused.id,
            {TaskStatus.INPUT_REQUIRED},
            TaskStatus.QUEUED,
            event=("input_answered", {}),
            entries=[answer],
        )

    assert (await store.get(paused.id)).status is TaskStatus.INPUT_REQUIRED
    assert await store.events(paused.id) == before


async def test_a_paused_task_can_be_cancelled_and_its_request_goes(store: TaskStore) -> None:
    paused = await _paused(store, _request())
    cancelled = await store.transition(paused.id, {TaskStatus.INPUT_REQUIRED}, TaskStatus.CANCELLED)
    assert cancelled.approval is None and cancelled.finished_at is not None
    assert await store.expired_approvals(now=utcnow() + timedelta(days=1)) == []


async def test_expired_approvals_lists_waiting_tasks_past_their_deadline(store: TaskStore) -> None:
    soon = await _paused(store, _request(expires_in_s=60))
    later = await _paused(store, _request(expires_in_s=7200))

    assert await store.expired_approvals() == []
    in_an_hour = await store.expired_approvals(now=utcnow() + timedelta(hours=1))
    assert [t.id for t in in_an_hour] == [soon.id]
    in_a_day = await store.expired_approvals(now=utcnow() + timedelta(days=1))
    assert [t.id for t in in_a_day] == [soon.id, later.id]
    assert len(await store.expired_approvals(now=utcnow() + timedelta(days=1), limit=1)) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_migration_5_adds_the_approval_columns_to_an_old_database(backend: str, tmp_path: Path) -> None:
    """A database written by schema version 4: no approval columns."""
    from sqlalchemy import text

    async with _old_database(backend, tmp_path) as (store, reopen):
        old = await store.create(_task())
        async with store._tx() as conn:  # white-box: rebuild the version-4 shape by hand
            await conn.execute(text("DROP INDEX ix_tasks_status_approval"))
            await conn.execute(text("ALTER TABLE tasks DROP COLUMN approval"))
            await conn.execute(text("ALTER TABLE tasks DROP COLUMN approval_expires_at"))
            await conn.execute(text("DELETE FROM schema_version WHERE version > 4"))
        again = await reopen()
        assert (await again.get(old.id)).approval is None
        assert await again.claim(old.id, "w1", ttl_s=3600, max_attempts=3) is not None
        request = _request(expires_in_s=1)
        await again.transition(
            old.id, {TaskStatus.RUNNING}, TaskStatus.INPUT_REQUIRED, owner="w1", approval=request
        )
        assert (await again.get(old.id)).approval == request
        expired = await again.expired_approvals(now=utcnow() + timedelta(seconds=5))
        assert [t.id for t in expired] == [old.id]


# --- the audit of exposed calls ----------------------------------------------------------


def _call(i: int, **fields: Any) -> ExposedCall:
    values: dict[str, Any] = {
        "principal": "alice" if i % 2 else "bob",
        "server": "fs" if i < 3 else "gh",
        "kind": "tool",
        "name": f"t{i}",
        "arguments": {"i": i, "nested": {"path": "/srv"}},
        "outcome": "ok",
        "duration_ms": 1.5 + i,
    }
    return ExposedCall(**(values | fields))


async def test_exposed_calls_are_kept_and_paged_newest_first_by_principal_and_server(
    store: TaskStore,
) -> None:
    base = utcnow()
    calls = [_call(i, at=base + timedelta(seconds=i)) for i in range(5)]
    calls[1] = calls[1].model_copy(update={"outcome": "error", "error": "no luck", "kind": "prompt"})
    for call in calls:
        await store.record_call(call)
    first = await store.list_calls(limit=2)
    assert [c.name for c in first.calls] == ["t4", "t3"] and first.next_cursor is not None
    rest = await store.list_calls(limit=10, cursor=first.next_cursor)
    assert [c.name for c in rest.calls] == ["t2", "t1", "t0"] and rest.next_cursor is None
    assert rest.calls[1:] == [calls[1], calls[0]]  # every field as recorded
    assert [c.name for c in (await store.list_calls(principal="alice")).calls] == ["t3", "t1"]
    assert [c.name for c in (await store.list_calls(principal="bob", server="fs")).calls] == ["t2", "t0"]
    assert (await store.list_calls(server="nowhere")).calls == []


async def test_an_exposed_call_is_recorded_once_and_bad_pages_are_refused(store: TaskStore) -> None:
    call = _call(0)
    await store.record_call(call)
    with pytest.raises(Conflict):
        await store.record_call(call)
    with pytest.raises(InvalidInput):
        await store.list_calls(limit=0)
    with pytest.raises(InvalidInput):
        await store.list_calls(cursor="not a cursor")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_migration_8_adds_the_idempotency_key_to_an_old_database(backend: str, tmp_path: Path) -> None:
    async with _downgraded(
        backend,
        tmp_path,
        "DROP INDEX ux_tasks_principal_key",
        "ALTER TABLE tasks DROP COLUMN idempotency_key",
        "DELETE FROM schema_version WHERE version > 7",
    ) as reopen:
        store = await reopen()
        keyed = await store.create(Task(spec=TaskSpec(goal="g"), idempotency_key="k"))
        with pytest.raises(KeyTaken):
            await store.create(Task(spec=TaskSpec(goal="g"), idempotency_key="k"))
        assert await store.get_by_key("local", "k") == keyed


# --- races -------------------------------------------------------------------------------

WRITERS = 20


async def test_exactly_one_concurrent_finisher_wins(open_new: StoreFactory) -> None:
    stores = [await open_new() for _ in range(WRITERS)]
    task = await stores[0].create(_task())
    assert await stores[0].claim(task.id, "w", ttl_s=3600, max_attempts=3) is not None
    finals = [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED]

    async def finish(i: int) -> Task:
        return await stores[i].transition(
            task.id, {TaskStatus.RUNNING}, finals[i % 3], result=f"writer {i}", error=f"writer {i}"
        )

    outcomes = await asyncio.gather(*(finish(i) for i in range(WRITERS)), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, Task)]
    losers = [o for o in outcomes if isinstance(o, IllegalTransition)]
    assert len(winners) == 1, outcomes
    assert len(losers) == WRITERS - 1, outcomes
    final = await stores[0].get(task.id)
    assert final.status is winners[0].status
    assert final.result == winners[0].result


async def test_concurrent_appenders_get_gapless_unique_seqs(open_new: StoreFactory) -> None:
    stores = [await open_new() for _ in range(WRITERS)]
    task = await stores[0].create(_task())
    per_writer = 5

    async def write(i: int) -> list[int]:
        return [
            (await stores[i].append_event(task.id, "log", {"writer": i, "n": n})).seq
            for n in range(per_writer)
        ]

    results = await asyncio.gather(*(write(i) for i in range(WRITERS)))
    seqs = sorted(s for r in results for s in r)
    total = WRITERS * per_writer
    assert seqs == list(range(2, total + 2))  # after create's queued event
    stored = await stores[0].events(task.id)
    assert [e.seq for e in stored] == list(range(1, total + 2))
    for r in results:
        assert r == sorted(r)


# --- URLs and failures (backend-specific, so outside the parametrised contract) ----------


def test_the_pool_is_sized_to_the_workers_concurrency() -> None:
    assert pool_size_for(None, None) == 12  # serve and the CLI: the default worker's 8 + 4
    assert pool_size_for(StoreSettings(), 20) == 24
    assert pool_size_for(StoreSettings(), 1000) == 32  # a short transaction each: capped
    assert pool_size_for(StoreSettings(pool_size=3), 1000) == 3
    from opspawn_mcp.store.sql import SqlStore

    store = open_store(POSTGRES_URL, settings=StoreSettings(pool_size=7), concurrency=100)
    assert isinstance(store, SqlStore) and store.pool_size == 7
    default = open_store(POSTGRES_URL)
    assert isinstance(default, SqlStore) and default.pool_size == 12


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_pool_with_no_free_connection_is_unavailable_not_a_crash(
    backend: str, tmp_path: Path
) -> None:
    """Every connection busy past the checkout timeout is an outage the caller retries (the
    worker re-enqueues), not SQLAlchemy's TimeoutError escaping as a bug."""
    from opspawn_mcp.store.sql import SqlStore

    schema = None
    if backend == "postgres":
        require_service("postgres")
        schema = f"opspawn_test_{uuid.uuid4().hex[:12]}"
        url = POSTGRES_URL
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}"
    store = SqlStore(url, schema=schema, pool_size=1, max_overflow=0, pool_timeout_s=0.05)
    await store.start()
    try:
        task = await store.create(_task())
        async with store._tx(write=False):  # white-box: hold the only connection
            with pytest.raises(Unavailable) as caught:
                await store.get(task.id)
            assert "pool_size" in caught.value.message
            with pytest.raises(Unavailable):
                await store.append_event(task.id, "log", {})
        # Once the connection is back, the same calls work.
        assert (await store.get(task.id)).id == task.id
        assert (await store.append_event(task.id, "log", {})).seq == 2
    finally:
        await store.close()
        if schema is not None:
            await drop_schema(schema)


async def _terminate(store: TaskStore) -> None:
    """Kill the store's one PostgreSQL backend from another connection, as a server restart
    would, and wait until it is gone (``pg_terminate_backend``'s timeout argument)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from opspawn_mcp.store.sql import SqlStore

    assert isinstance(store, SqlStore)
    async with store._tx(write=False) as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    admin = create_async_engine(POSTGRES_URL, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            killed = await conn.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
            assert killed.scalar_one() is True
    finally:
        await admin.dispose()


async def test_a_dropped_postgres_connection_heals_without_pre_ping() -> None:
    """No ``pool_pre_ping``: a connection the server dropped is found dead by its first
    statement and the call retries once on a fresh one: always for reads and idempotent
    writes; for other writes only when the driver knew before sending anything (the usual
    case; otherwise the write may have happened, so it reports ``Unavailable`` once and the
    caller retries). Either way the next call succeeds."""
    from opspawn_mcp.store.sql import SqlStore

    require_service("postgres")
    schema = f"opspawn_test_{uuid.uuid4().hex[:12]}"
    # One connection, so the backend we kill is the one the next call will check out.
    store = SqlStore(POSTGRES_URL, schema=schema, pool_size=1, max_overflow=0)
    await store.start()
    try:
        task = await _running(store)
        await _terminate(store)
        assert (await store.get(task.id)).id == task.id  # a read: healed inside the call
        await _terminate(store)
        assert await store.renew_many({task.id: "w1"}, ttl_s=60) == {task.id}  # idempotent write
        await _terminate(store)
        with contextlib.suppress(Unavailable):  # a write is not repeated blindly: the caller retries
            await store.record(task.id, "w1", "log", {"try": 1}, steps=1, usage=Usage())
        event = await store.record(task.id, "w1", "log", {"try": 2}, steps=1, usage=Usage())
        assert event is not None
        assert [e.seq for e in await store.events(task.id)] == list(range(1, event.seq + 1))
    finally:
        await store.close()
        await drop_schema(schema)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root@localhost/db",
        "sqlite:///plain-driver.db",
        "postgresql://postgres@localhost/db",
        "redis://x",
    ],
)
def test_open_store_rejects_unknown_urls_and_says_what_works(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        open_store(url)
    assert "memory://" in caught.value.message and "sqlite+aiosqlite:///" in caught.value.message


def test_open_store_hides_the_password_of_a_bad_url() -> None:
    with pytest.raises(InvalidInput) as caught:
        open_store("mysql://root:hunter2@localhost/db")
    assert "hunter2" not in caught.value.message


@pytest.mark.parametrize(
    ("url", "schema"),
    [
        ("sqlite+aiosqlite://", None),
        ("sqlite+aiosqlite:///:memory:", None),
        ("sqlite+aiosqlite:///x.db", "tenant"),
        ("memory://", "tenant"),
        ("postgresql+asyncpg://postgres@localhost/test?schema=bad-name", None),
        ("postgresql+asyncpg://postgres@localhost/test?schema=a", "b"),
    ],
)
def test_open_store_rejects_unusable_combinations(url: str, schema: str | None) -> None:
    with pytest.raises(InvalidInput):
        open_store(url, schema=schema)


def test_open_store_picks_the_implementation(tmp_path: Path) -> None:
    from opspawn_mcp.store.sql import SqlStore

    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"), SqlStore)
    pg = open_store("postgresql+asyncpg://postgres@localhost/test?schema=tenant_1")
    assert isinstance(pg, SqlStore) and pg.schema == "tenant_1"


async def test_unreachable_postgres_is_unavailable_at_start_and_ping() -> None:
    from opspawn_mcp.errors import Unavailable

    store = open_store("postgresql+asyncpg://postgres:secret@127.0.0.1:1/test")
    try:
        with pytest.raises(Unavailable) as caught:
            await store.start()
        assert "127.0.0.1:1" in caught.value.message and "secret" not in caught.value.message
        with pytest.raises(Unavailable):
            await store.ping()
    finally:
        await store.close()


async def test_sqlite_in_an_impossible_folder_is_unavailable(tmp_path: Path) -> None:
    from opspawn_mcp.errors import Unavailable

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = open_store(f"sqlite+aiosqlite:///{blocker / 'opspawn.db'}")
    with pytest.raises(Unavailable):
        await store.start()
    await store.close()


async def test_ping_of_a_closed_store_is_unavailable(store: TaskStore) -> None:
    from opspawn_mcp.errors import Unavailable

    await store.ping()
    await store.close()
    with pytest.raises(Unavailable):
        await store.ping()
    await store.start()
    await store.ping()


async def test_sqlite_creates_parent_folders_and_uses_wal(tmp_path: Path) -> None:
    from sqlalchemy import text

    from opspawn_mcp.store.sql import SqlStore

    path = tmp_path / "deep" / "er" / "opspawn.db"
    store = open_store(f"sqlite+aiosqlite:///{path}")
    assert isinstance(store, SqlStore)
    await store.start()
    try:
        assert path.exists()
        async with store._tx(write=False) as conn:  # white-box: the pragma is the point
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
    finally:
        await store.close()


async def test_newer_schema_than_the_code_is_refused(tmp_path: Path) -> None:
    from sqlalchemy import insert

    from opspawn_mcp.errors import Unavailable
    from opspawn_mcp.store.sql import SqlStore
    from opspawn_mcp.store.sql_schema import schema_version

    url = f"sqlite+aiosqlite:///{tmp_path / 'opspawn.db'}"
    store = open_store(url)
    assert isinstance(store, SqlStore)
    await store.start()
    async with store._tx() as conn:
        await conn.execute(
            insert(schema_version).values(version=999, description="future", applied_at=utcnow())
        )
    await store.close()
    again = open_store(url)
    with pytest.raises(Unavailable) as caught:
        await again.start()
    assert "999" in caught.value.message
    await again.close()


async def test_postgres_schema_from_the_url_isolates_stores() -> None:
    require_service("postgres")
    first_schema = f"opspawn_test_{uuid.uuid4().hex[:12]}"
    second_schema = f"opspawn_test_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in POSTGRES_URL else "?"
    first = open_store(f"{POSTGRES_URL}{sep}schema={first_schema}")
    second = open_store(POSTGRES_URL, schema=second_schema)
    try:
        await first.start()
        await second.start()
        task = await first.create(_task())
        assert (await first.get(task.id)).id == task.id
        with pytest.raises(TaskNotFound):
            await second.get(task.id)
    finally:
        await first.close()
        await second.close()
        await drop_schema(first_schema)
        await drop_schema(second_schema)


async def test_times_in_other_zones_come_back_as_the_same_instant_in_utc(store: TaskStore) -> None:
    from datetime import timezone

    local = utcnow().astimezone(timezone(timedelta(hours=5, minutes=30)))
    task = await store.create(_task().model_copy(update={"created_at": local}))
    got = await store.get(task.id)
    assert got.created_at == local
    assert got.created_at.utcoffset() == timedelta(0)
    later = await store.expired(now=local + timedelta(days=1))
    assert later == []


async def test_many_stores_starting_at_once_migrate_exactly_once(open_new: StoreFactory) -> None:
    stores = await asyncio.gather(*(open_new() for _ in range(WRITERS)))
    task = await stores[0].create(_task())
    assert all([(await s.get(task.id)).id == task.id for s in stores])
    from opspawn_mcp.store.sql import SqlStore

    for s in stores:
        if isinstance(s, SqlStore):
            assert await s.schema_version() == SCHEMA_VERSION


# --- events wake watchers --------------------------------------------------------------------
#
# A watcher parks in ``wait_for_change``; the tests give it a long timeout (a wait that times
# out returns False and fails the test), so nothing depends on how fast the machine is. The
# writer is a second store instance where there can be one: two pools on one PostgreSQL schema
# (as two processes would be, so only NOTIFY can carry the wakeup), two engines on one SQLite
# file (no NOTIFY there: the store's shared one-second poll carries it, which is how a worker
# process on the same file reaches serve's watchers).

WAKE_TIMEOUT_S = 60.0


async def _until(condition: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    """A bounded wait for a background state (a listener connected), polling every 10 ms."""
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting until {what}")


async def _listening(store: TaskStore) -> None:
    """PostgreSQL: until the store's LISTEN connection is up, so a wakeup must come by NOTIFY."""
    from opspawn_mcp.store.sql import SqlStore

    if isinstance(store, SqlStore) and store.schema is not None:  # the fixtures' PostgreSQL
        # Starting the listener takes a waiter; a short one on a task nobody writes does.
        await store.wait_for_change("nobody-writes-this", 0, 0.01)
        await _until(lambda: store.listening, "the store listens")


def reader_hub(store: TaskStore) -> Any:
    """The store's ``ChangeHub`` (every implementation has one, as ``changes``)."""
    return store.changes  # type: ignore[attr-defined]


async def _waiter(store: TaskStore, task_id: str, seq: int) -> asyncio.Task[bool]:
    """A parked watcher of ``task_id`` that has seen up to ``seq``."""
    waiter = asyncio.create_task(store.wait_for_change(task_id, seq, WAKE_TIMEOUT_S))
    await asyncio.sleep(0)  # it registers before the caller writes
    return waiter


async def test_a_waiter_wakes_on_every_kind_of_event_write_by_another_instance(
    open_new: StoreFactory,
) -> None:
    reader, writer = await open_new(), await open_new()
    await _listening(reader)
    task = _task()
    woke = await _waiter(reader, task.id, 0)
    await writer.create(task)
    assert await woke is True
    await writer.claim(task.id, "w1", ttl_s=60, max_attempts=3)
    writes = [
        lambda: writer.append_event(task.id, "log", {"line": 1}),
        lambda: writer.record(task.id, "w1", "progress", {"step": 1}, steps=1, usage=Usage()),
        lambda: writer.transition(task.id, {TaskStatus.RUNNING}, TaskStatus.COMPLETED, result="ok"),
    ]
    for seq, write in enumerate(writes, start=1):
        woke = await _waiter(reader, task.id, seq)
        await write()
        assert await woke is True
        assert [e.seq for e in await reader.events(task.id, seq)] == [seq + 1]


async def test_a_waiter_is_woken_only_by_writes_to_its_own_task(open_new: StoreFactory) -> None:
    reader, writer = await open_new(), await open_new()
    await _listening(reader)
    a, b = await writer.create(_task(goal="a")), await writer.create(_task(goal="b"))
    woken_before = reader_hub(reader).woken
    on_a = await _waiter(reader, a.id, 1)
    on_b = await _waiter(reader, b.id, 1)
    for line in range(3):
        await writer.append_event(b.id, "log", {"line": line})
    assert await on_b is True
    for _ in range(10):  # let anything else that one delivery woke run
        await asyncio.sleep(0)
    assert not on_a.done()
    assert reader_hub(reader).woken == woken_before + 1
    await writer.append_event(a.id, "log", {"line": 0})
    assert await on_a is True
    assert reader_hub(reader).woken == woken_before + 2


async def test_a_wait_that_nobody_wakes_times_out_and_an_old_write_returns_at_once(
    store: TaskStore,
) -> None:
    task = await store.create(_task())
    assert await store.wait_for_change(task.id, 1, 0.01) is False
    assert await store.wait_for_change(task.id, 0, WAKE_TIMEOUT_S) is True  # seq 1 is newer than 0
    assert await store.wait_for_change("no-such-task", 0, 0.01) is False


async def test_stores_on_two_postgres_schemas_do_not_wake_each_other() -> None:
    """Each schema has its own channel: the same task id in two schemas (two isolated stores on
    one server) is woken only by its own schema's writers."""
    from opspawn_mcp.store.sql import SqlStore

    require_service("postgres")
    schemas = [f"opspawn_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    stores = [SqlStore(POSTGRES_URL, schema=s) for s in schemas for _ in range(2)]
    mine, my_writer, theirs, their_writer = stores
    try:
        for s in stores:
            await s.start()
        assert mine.channel == my_writer.channel != theirs.channel
        shared = _task()
        await my_writer.create(shared)
        await their_writer.create(shared)
        probe = await my_writer.create(_task(goal="probe"))
        await _listening(mine)
        await _listening(theirs)
        on_shared = await _waiter(mine, shared.id, 1)
        on_probe = await _waiter(mine, probe.id, 1)
        their_side = await _waiter(theirs, shared.id, 1)
        await their_writer.append_event(shared.id, "log", {"schema": "theirs"})
        assert await their_side is True
        # NOTIFYs reach a listener in commit order, so once a later write of our own schema
        # has woken us, a crossed notification from theirs would have arrived before it.
        await my_writer.append_event(probe.id, "log", {"schema": "mine"})
        assert await on_probe is True
        assert not on_shared.done()
        on_shared.cancel()
    finally:
        for s in stores:
            await s.close()
        for schema in schemas:
            await drop_schema(schema)


async def _admin(sql: str, **params: Any) -> Any:
    """One statement on a connection of its own (not any store's)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    admin = create_async_engine(POSTGRES_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            result = await conn.execute(text(sql), params)
            return result.scalar() if result.returns_rows else None
    finally:
        await admin.dispose()


async def test_a_dropped_listener_falls_back_to_polling_and_reconnects() -> None:
    """Kill only the LISTEN connection (found by its application_name). The reader runs as a
    role of its own whose connection limit is then lowered to what it already holds, so the
    listener cannot come back: the write of another store (another process, for all the
    reader can tell) must reach it by the fallback poll. With the limit lifted, the listener
    reconnects (new backend) and NOTIFY wakes it again; the pool's session survived it all."""
    from sqlalchemy.engine import make_url

    from opspawn_mcp.store.sql import SqlStore

    require_service("postgres")
    suffix = uuid.uuid4().hex[:12]
    schema, role = f"opspawn_test_{suffix}", f"opspawn_test_role_{suffix}"
    await _admin(f'CREATE ROLE "{role}" LOGIN')
    await _admin(f'GRANT CREATE ON DATABASE "{make_url(POSTGRES_URL).database}" TO "{role}"')
    as_role = make_url(POSTGRES_URL).set(username=role).render_as_string(hide_password=False)
    # One pooled connection plus the listener: the two sessions the role's limit will allow.
    reader = SqlStore(as_role, schema=schema, pool_size=1, max_overflow=0)
    writer = SqlStore(POSTGRES_URL, schema=schema)
    listener_pid = "SELECT pid FROM pg_stat_activity WHERE application_name = :name"
    name = f"opspawn-listen {reader.channel}"
    try:
        await reader.start()
        await writer.start()
        task = await writer.create(_task())
        await _listening(reader)
        first_pid = await _admin(listener_pid, name=name)
        assert first_pid is not None
        pool_pid = await _pool_pid(reader)
        woke = await _waiter(reader, task.id, 1)
        await _admin(f'ALTER ROLE "{role}" CONNECTION LIMIT 1')
        assert await _admin("SELECT pg_terminate_backend(:pid, 10000)", pid=first_pid) is True
        await _until(lambda: not reader.listening, "the reader notices its listener is gone")
        await writer.append_event(task.id, "log", {"while": "polling"})
        assert await woke is True
        assert not reader.listening  # it cannot reconnect: the wakeup was the fallback poll's
        await _admin(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        await _until(lambda: reader.listening, "the listener reconnects")
        assert await _admin(listener_pid, name=name) not in (None, first_pid)
        woke = await _waiter(reader, task.id, 2)
        await writer.append_event(task.id, "log", {"while": "listening"})
        assert await woke is True
        assert await _pool_pid(reader) == pool_pid  # only the listener was terminated
    finally:
        await reader.close()
        await writer.close()
        await drop_schema(schema)
        await _admin(f'REVOKE CREATE ON DATABASE "{make_url(POSTGRES_URL).database}" FROM "{role}"')
        await _admin(f'DROP ROLE IF EXISTS "{role}"')


async def _pool_pid(store: TaskStore) -> int:
    from sqlalchemy import text

    from opspawn_mcp.store.sql import SqlStore

    assert isinstance(store, SqlStore)
    async with store._tx(write=False) as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
