"""The gRPC door's mapping, against a real grpc.aio server over the real TaskService.

The service's rules are tested in test_service.py; here: that each method is the service
call, that results round-trip to the shared models, that typed errors become the right
status codes, and that auth, health checking and reflection work as standard clients expect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from opspawn_mcp.config import parse_config
from opspawn_mcp.errors import Unavailable
from opspawn_mcp.grpc_internal import serve_grpc
from opspawn_mcp.grpc_internal.convert import event_from_pb, task_from_pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc
from opspawn_mcp.limits import IN_FLIGHT_RETRY_S
from opspawn_mcp.models import Task, Usage
from opspawn_mcp.principals import LOCAL, Principals
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import WARNING, BrokenStore, RecordingEnqueuer, finish, make_service

TOKEN = "grpc_token"


class DownStore(MemoryStore):
    """A store whose database has gone away: every read fails the way the SQL store's do."""

    async def get(self, task_id: str) -> Task:
        raise Unavailable("The task store cannot be reached; retry later.")


def principals_with(tokens: dict[str, Any]) -> Principals:
    """The principals of a config whose ``opspawn.server.tokens`` are ``tokens``; each token's
    value is its env variable's name in lower case."""
    environ = {t["token_env"]: t["token_env"].lower() for t in tokens.values()}
    config = parse_config({"opspawn": {"server": {"tokens": tokens}}}, environ=environ)
    return Principals.from_config(config, environ)


NO_TOKENS = Principals.from_config(parse_config({}, environ={}), {})


@asynccontextmanager
async def connected(
    service: TaskService, principals: Principals = NO_TOKENS
) -> AsyncIterator[grpc.aio.Channel]:
    """``service`` served over gRPC on a free loopback port, and a channel to it."""
    async with (
        serve_grpc(service, "127.0.0.1", 0, principals, readiness_interval_s=0.01) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        yield ch


def task_stub(channel: grpc.aio.Channel) -> Any:
    return pb_grpc.TaskServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
async def channel(service: TaskService) -> AsyncIterator[grpc.aio.Channel]:
    async with connected(service) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Any:
    return task_stub(channel)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_submit_then_get_round_trips_to_the_service_model(
    stub: Any, service: TaskService, enqueuer: RecordingEnqueuer
) -> None:
    spec = pb.TaskSpec(goal="echo hi", max_steps=3, servers=["echo"], model=pb.ModelSettings(temperature=0.5))
    created = await stub.SubmitTask(pb.SubmitTaskRequest(spec=spec))
    assert created.status == pb.TASK_STATUS_QUEUED
    assert enqueuer.ids == [created.id]
    fetched = await stub.GetTask(pb.GetTaskRequest(task_id=created.id))
    expected = (await service.get(created.id, by=LOCAL)).model_dump()
    assert task_from_pb(fetched).model_dump() == expected
    assert expected["spec"]["servers"] == ["echo"]
    assert expected["spec"]["timeout_s"] == 300.0  # unset fields took the model's defaults


async def test_servers_unset_means_all_and_restricted_empty_means_none(
    stub: Any, service: TaskService
) -> None:
    open_task = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="a")))
    assert (await service.get(open_task.id, by=LOCAL)).spec.servers is None
    closed = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="b", restrict_servers=True)))
    assert (await service.get(closed.id, by=LOCAL)).spec.servers == []
    assert task_from_pb(closed).spec.servers == []


@pytest.mark.parametrize(
    ("spec", "code", "words"),
    [
        (
            pb.TaskSpec(goal=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "The goal is empty; say what the agent must do.",
        ),
        (pb.TaskSpec(goal="x", max_steps=0), grpc.StatusCode.INVALID_ARGUMENT, "max_steps"),
        (pb.TaskSpec(goal="x", planner="yolo"), grpc.StatusCode.INVALID_ARGUMENT, "planner"),
        (pb.TaskSpec(goal="x", servers=["evil"]), grpc.StatusCode.PERMISSION_DENIED, "'evil'"),
        (pb.TaskSpec(goal="x" * 20_001), grpc.StatusCode.INVALID_ARGUMENT, "20000"),
    ],
)
async def test_bad_specs_map_to_their_codes(
    stub: Any, spec: pb.TaskSpec, code: grpc.StatusCode, words: str
) -> None:
    got, details = await code_of(stub.SubmitTask(pb.SubmitTaskRequest(spec=spec)))
    assert got == code
    assert words in details


async def test_not_found_and_conflict(stub: Any, store: MemoryStore) -> None:
    assert (await code_of(stub.GetTask(pb.GetTaskRequest(task_id="nope"))))[0] == grpc.StatusCode.NOT_FOUND
    assert (await code_of(stub.CancelTask(pb.CancelTaskRequest(task_id="nope"))))[
        0
    ] == grpc.StatusCode.NOT_FOUND
    task = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="x")))
    await finish(store, task.id, "ok")
    code, details = await code_of(stub.CancelTask(pb.CancelTaskRequest(task_id=task.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "completed" in details


async def test_usage_carries_its_total_like_every_door(stub: Any, store: MemoryStore) -> None:
    task = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="x")))
    await store.record_progress(task.id, 1, Usage(input_tokens=30, output_tokens=12))
    got = await stub.GetTask(pb.GetTaskRequest(task_id=task.id))
    assert (got.usage.input_tokens, got.usage.output_tokens, got.usage.total_tokens) == (30, 12, 42)
    assert task_from_pb(got).usage == Usage(input_tokens=30, output_tokens=12)


async def test_a_completed_tasks_warning_is_a_field(stub: Any, store: MemoryStore) -> None:
    task = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="x")))
    assert not task.HasField("warning")
    await finish(store, task.id, "done: disk full", warning=WARNING)
    got = await stub.GetTask(pb.GetTaskRequest(task_id=task.id))
    assert (got.status, got.warning) == (pb.TASK_STATUS_COMPLETED, WARNING)
    assert task_from_pb(got).warning == WARNING


async def test_cancel_a_queued_task(stub: Any) -> None:
    task = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="x")))
    cancelled = await stub.CancelTask(pb.CancelTaskRequest(task_id=task.id))
    assert cancelled.status == pb.TASK_STATUS_CANCELLED
    assert cancelled.HasField("finished_at")


async def test_list_filters_and_pages(stub: Any, store: MemoryStore) -> None:
    ids = [(await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal=f"g{i}")))).id for i in range(5)]
    await finish(store, ids[0], "ok")
    seen: list[str] = []
    request = pb.ListTasksRequest(status=pb.TASK_STATUS_QUEUED, limit=2)
    while True:
        page = await stub.ListTasks(request)
        seen += [t.id for t in page.items]
        if not page.HasField("next_cursor"):
            break
        request = pb.ListTasksRequest(status=pb.TASK_STATUS_QUEUED, limit=2, cursor=page.next_cursor)
    assert sorted(seen) == sorted(ids[1:])
    every = await stub.ListTasks(pb.ListTasksRequest())
    assert len(every.items) == 5
    code, _ = await code_of(stub.ListTasks(pb.ListTasksRequest(limit=0)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_streams_until_the_task_ends_and_resumes(stub: Any, store: MemoryStore) -> None:
    task = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="x")))
    call = stub.WatchTask(pb.WatchTaskRequest(task_id=task.id))
    first = await call.read()
    assert event_from_pb(first).data == {"status": "queued"}
    # The stream ends only because the task ends: finishing it is what closes the stream.
    await finish(store, task.id, "42")
    rest = []
    while (message := await call.read()) is not grpc.aio.EOF:
        rest.append(event_from_pb(message))
    assert [e.kind for e in rest] == ["state", "final", "state"]
    assert rest[1].data == {"result": "42"}
    resumed = [e.seq async for e in stub.WatchTask(pb.WatchTaskRequest(task_id=task.id, after_seq=2))]
    assert resumed == [3, 4]


async def test_watch_unknown_task_is_not_found(stub: Any) -> None:
    call = stub.WatchTask(pb.WatchTaskRequest(task_id="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_unreachable_store_is_unavailable() -> None:
    async with connected(make_service(DownStore())) as ch:
        stub = task_stub(ch)
        code, _ = await code_of(stub.GetTask(pb.GetTaskRequest(task_id="x")))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_health_follows_readiness(channel: grpc.aio.Channel, store: MemoryStore) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    name = "opspawn.v1.TaskService"
    ok = await health.Check(health_pb2.HealthCheckRequest(service=name))
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=name))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    await store.close()  # the store goes down; the next readiness refresh reports it
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"opspawn.v1.TaskService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    "metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
)
async def test_with_a_token_calls_without_it_are_unauthenticated(
    service: TaskService, metadata: tuple[tuple[str, str], ...] | None
) -> None:
    async with connected(service, principals_with({"ops": {"token_env": TOKEN.upper()}})) as ch:
        stub = task_stub(ch)
        request = pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="x"))
        code, _ = await code_of(stub.SubmitTask(request, metadata=metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        watch = stub.WatchTask(pb.WatchTaskRequest(task_id="x"), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch.read()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.SubmitTask(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert ok.status == pb.TASK_STATUS_QUEUED
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING


async def test_a_bug_is_internal_without_its_details() -> None:
    async with connected(make_service(BrokenStore())) as ch:
        stub = task_stub(ch)
        code, details = await code_of(stub.GetTask(pb.GetTaskRequest(task_id="x")))
        assert code == grpc.StatusCode.INTERNAL
        assert "secret" not in details
        watch = stub.WatchTask(pb.WatchTaskRequest(task_id="x"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch.read()
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (info.value.details() or "")


async def test_principals_see_only_their_own_tasks(service: TaskService) -> None:
    tokens = {"alice": {"token_env": "ALICE"}, "bob": {"token_env": "BOB"}}
    async with connected(service, principals_with(tokens)) as ch:
        stub = task_stub(ch)
        alice, bob = ((("authorization", f"Bearer {name}"),) for name in ("alice", "bob"))
        task = await stub.SubmitTask(pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="mine")), metadata=alice)
        assert task.principal == "alice"
        for call in (
            stub.GetTask(pb.GetTaskRequest(task_id=task.id), metadata=bob),
            stub.CancelTask(pb.CancelTaskRequest(task_id=task.id), metadata=bob),
        ):
            assert (await code_of(call))[0] == grpc.StatusCode.NOT_FOUND
        watch = stub.WatchTask(pb.WatchTaskRequest(task_id=task.id), metadata=bob)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch.read()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len((await stub.ListTasks(pb.ListTasksRequest(), metadata=bob)).items) == 0
        assert len((await stub.ListTasks(pb.ListTasksRequest(), metadata=alice)).items) == 1


async def test_an_unknown_status_number_is_invalid_argument_without_exception_text(stub: Any) -> None:
    code, details = await code_of(stub.ListTasks(pb.ListTasksRequest(status=99)))  # type: ignore[arg-type]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in details and "ValueError" not in details and "Unexpected" not in details


async def test_over_the_limit_is_resource_exhausted_with_retry_after(service: TaskService) -> None:
    tokens = {"capped": {"token_env": "CAPPED", "limits": {"max_in_flight": 1}}}
    principals = principals_with(tokens)
    assert principals.authenticate("Bearer capped") is not None
    async with connected(service, principals) as ch:
        stub = task_stub(ch)
        metadata = (("authorization", "Bearer capped"),)
        request = pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="x"))
        await stub.SubmitTask(request, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitTask(request, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(info.value.trailing_metadata() or ())["retry-after"] == str(int(IN_FLIGHT_RETRY_S))


async def test_a_repeated_submit_with_idempotency_key_metadata_answers_the_first_task(
    stub: Any, enqueuer: RecordingEnqueuer
) -> None:
    request = pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="echo hi"))
    keyed = (("idempotency-key", "k:1"),)
    first = await stub.SubmitTask(request, metadata=keyed)
    again = await stub.SubmitTask(request, metadata=keyed)
    assert again.id == first.id and enqueuer.ids == [first.id]
    other = pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="echo bye"))
    code, details = await code_of(stub.SubmitTask(other, metadata=keyed))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "(goal differ)" in details
