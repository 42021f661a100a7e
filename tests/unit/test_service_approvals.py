"""TaskService.answer and the approval timeout: what an answer records, and every way it is refused.

The pause itself is the worker's (tests/integration/test_worker_approvals.py); here the task is
paused through the real store as a worker would (``service_kit.pause``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from opspawn_mcp.approvals import time_out_approvals
from opspawn_mcp.config import Limits
from opspawn_mcp.errors import Conflict, InvalidInput, RateLimited, TaskNotFound
from opspawn_mcp.models import APPROVAL_NOTE_MAX_CHARS, ApprovalAnswer, Task, TaskStatus, utcnow
from opspawn_mcp.principals import LOCAL, Principal
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import RecordingEnqueuer, pause

ALICE = Principal("alice")
BOB = Principal("bob")
ADMIN = Principal("root", admin=True)


async def paused(service: TaskService, store: MemoryStore, by: Principal = LOCAL) -> Task:
    task = await service.submit({"goal": "delete /tmp/x"}, by=by)
    return await pause(store, task.id)


async def test_a_paused_task_shows_its_request_and_can_be_listed_by_its_state(
    service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    seen = await service.get(task.id, by=LOCAL)
    assert seen.status is TaskStatus.INPUT_REQUIRED
    assert seen.approval is not None
    assert (seen.approval.server, seen.approval.tool) == ("files", "delete")
    assert seen.approval.arguments == {"path": "/tmp/x"}
    assert "delete" in seen.approval.message and '"/tmp/x"' in seen.approval.message
    assert "tool_call" not in seen.model_dump(mode="json")["approval"]  # internal key stays inside
    page = await service.list_tasks("input_required", by=LOCAL)
    assert [t.id for t in page.items] == [task.id]


async def test_a_wait_returns_when_the_task_pauses_for_a_person(
    service: TaskService, store: MemoryStore
) -> None:
    task = await service.submit({"goal": "delete /tmp/x"}, by=LOCAL)
    waiting = asyncio.create_task(service.wait(task.id, 600, by=LOCAL))  # pytest's timeout guards
    await pause(store, task.id)
    assert (await waiting).status is TaskStatus.INPUT_REQUIRED


async def test_approving_records_the_answer_and_queues_the_task_for_any_worker(
    service: TaskService, store: MemoryStore, enqueuer: RecordingEnqueuer
) -> None:
    task = await paused(service, store)
    assert task.approval is not None

    resumed = await service.answer(task.id, task.approval.id, ApprovalAnswer(approve=True), by=LOCAL)

    assert resumed.status is TaskStatus.QUEUED and resumed.approval is None
    assert enqueuer.ids == [task.id, task.id]
    answered = [e for e in await service.events(task.id, by=LOCAL) if e.kind == "input_answered"]
    assert [e.data for e in answered] == [
        {"request_id": task.approval.id, "approve": True, "note": None, "by": "local"}
    ]
    journal = await store.journal(task.id)
    assert [(r.kind, r.ordinal, r.data) for r in journal] == [
        ("approval", 1, {"approved": True, "by": "local", "note": None})
    ]


async def test_a_denial_carries_who_and_why_to_the_journal_and_the_state_event(
    service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    assert task.approval is not None

    await service.answer(task.id, task.approval.id, {"approve": False, "note": "keep it"}, by=LOCAL)

    assert (await store.journal(task.id))[0].data == {"approved": False, "by": "local", "note": "keep it"}
    states = [e.data for e in await service.events(task.id, by=LOCAL) if e.kind == "state"]
    assert states[-1] == {"status": "queued", "reason": "denied by local: keep it"}


async def test_an_answer_to_another_request_is_a_conflict_naming_the_pending_one(
    service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    assert task.approval is not None
    with pytest.raises(Conflict) as info:
        await service.answer(task.id, "not-it", ApprovalAnswer(approve=True), by=LOCAL)
    assert task.approval.id in info.value.message and "input_required" in info.value.message
    assert info.value.details["pending_request_id"] == task.approval.id
    assert (await store.get(task.id)).status is TaskStatus.INPUT_REQUIRED


async def test_answering_a_task_that_waits_for_nothing_is_a_conflict_naming_its_state(
    service: TaskService, store: MemoryStore
) -> None:
    task = await paused(service, store)
    assert task.approval is not None
    await service.answer(task.id, task.approval.id, ApprovalAnswer(approve=True), by=LOCAL)
    with pytest.raises(Conflict) as again:
        await service.answer(task.id, task.approval.id, ApprovalAnswer(approve=False), by=LOCAL)
    assert "queued" in again.value.message and "waits for no answer" in again.value.message
    assert len(await store.journal(task.id)) == 1
    fresh = await service.submit({"goal": "x"}, by=LOCAL)
    with pytest.raises(Conflict, match="queued"):
        await service.answer(fresh.id, "any", ApprovalAnswer(approve=True), by=LOCAL)


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({"note": "no approve"}, "approve"),
        ({"approve": "yes please"}, "approve"),
        ({"approve": True, "note": "x" * (APPROVAL_NOTE_MAX_CHARS + 1)}, "note"),
        ({"approve": False, "note": "nul\x00"}, "note"),
        ({"approve": True, "extra": 1}, "extra"),
        ("approve", "object"),
    ],
)
async def test_a_malformed_answer_is_invalid_input_saying_which_field(
    service: TaskService, store: MemoryStore, answer: object, field: str
) -> None:
    task = await paused(service, store)
    assert task.approval is not None
    with pytest.raises(InvalidInput, match=field):
        await service.answer(task.id, task.approval.id, answer, by=LOCAL)  # type: ignore[arg-type]
    assert (await store.get(task.id)).status is TaskStatus.INPUT_REQUIRED


@pytest.mark.parametrize("request_id", ["", "   ", None])
async def test_an_empty_request_id_is_invalid_input(
    service: TaskService, store: MemoryStore, request_id: object
) -> None:
    task = await paused(service, store)
    with pytest.raises(InvalidInput, match="request_id"):
        await service.answer(task.id, request_id, ApprovalAnswer(approve=True), by=LOCAL)  # type: ignore[arg-type]


async def test_only_the_owner_or_an_admin_may_answer(service: TaskService, store: MemoryStore) -> None:
    task = await paused(service, store, by=ALICE)
    assert task.approval is not None
    with pytest.raises(TaskNotFound):
        await service.answer(task.id, task.approval.id, ApprovalAnswer(approve=True), by=BOB)
    done = await service.answer(task.id, task.approval.id, ApprovalAnswer(approve=False), by=ADMIN)
    assert done.status is TaskStatus.QUEUED
    assert (await store.journal(task.id))[0].data["by"] == "root"


async def test_a_paused_task_can_be_cancelled(service: TaskService, store: MemoryStore) -> None:
    task = await paused(service, store)
    cancelled = await service.cancel(task.id, by=LOCAL)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.approval is None


async def test_an_unanswered_request_past_its_deadline_is_denied_and_queued(
    store: MemoryStore, enqueuer: RecordingEnqueuer, service: TaskService
) -> None:
    task = await service.submit({"goal": "x"}, by=LOCAL)
    await pause(store, task.id, timeout_s=5)
    patient = await pause(store, (await service.submit({"goal": "y"}, by=LOCAL)).id)
    a_minute_later = utcnow() + timedelta(minutes=1)

    assert await time_out_approvals(store, enqueuer.enqueue, a_minute_later) == 1
    assert await time_out_approvals(store, enqueuer.enqueue, a_minute_later) == 0

    assert (await store.get(task.id)).status is TaskStatus.QUEUED
    assert enqueuer.ids[-1] == task.id
    assert (await store.journal(task.id))[0].data == {
        "approved": False,
        "by": None,
        "note": "no answer within 5 s",
    }
    answered = [e.data for e in await store.events(task.id) if e.kind == "input_answered"]
    assert answered[0]["by"] is None and answered[0]["approve"] is False
    assert (await store.get(patient.id)).status is TaskStatus.INPUT_REQUIRED


async def test_a_waiting_task_is_still_in_flight_for_the_callers_limit(
    service: TaskService, store: MemoryStore
) -> None:
    capped = Principal("capped", limits=Limits(max_in_flight=1))
    task = await paused(service, store, by=capped)
    with pytest.raises(RateLimited, match="waiting for approval"):
        await service.submit({"goal": "another"}, by=capped)
    await service.cancel(task.id, by=capped)
    assert (await service.submit({"goal": "another"}, by=capped)).status is TaskStatus.QUEUED
