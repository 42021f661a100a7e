"""One trace per task: the door, the queue message, the worker's run, each model call and each
downstream MCP call, every span in the same trace and each the child of the step that caused it.

A real flow in this process, so the SDK's in-memory exporter sees every span: ``Runtime`` serving
real HTTP on a free port (embedded broker, SQLite store), the fake OpenAI-compatible LLM scripted
to call the testing MCP server's ``echo_meta`` (over stdio) and then answer. Spans are read after
the runtime has closed, when every span of the run has ended.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from mcp import Client
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from opspawn_mcp.config import parse_config
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc
from opspawn_mcp.grpc_internal.server import SERVICE_NAME
from opspawn_mcp.models import TaskStatus
from opspawn_mcp.principals import LOCAL
from opspawn_mcp.runtime import Runtime
from opspawn_mcp.server import WAIT_CAP_S
from opspawn_mcp.store import open_store
from opspawn_mcp.store.base import TaskStore
from opspawn_mcp.telemetry import tracing
from tests.servers.harness import HANG_GUARD_S, free_port, stdio_config
from tests.support.fake_openai import FakeOpenAIServer, tool_call
from tests.support.serve import fake_llm_profile
from tests.support.traces import named, one, parent_of, recording, span_id, trace_id


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@dataclass(frozen=True)
class Served:
    runtime: Runtime
    store: TaskStore
    base: str
    """The HTTP base URL."""


@asynccontextmanager
async def serving(tmp_path: Path, llm_url: str, grpc_port: int | None = None) -> AsyncIterator[Served]:
    """The runtime serving HTTP (and gRPC on ``grpc_port``), with its store."""
    config = parse_config(
        {
            "opspawn": {
                "store_url": f"sqlite+aiosqlite:///{tmp_path / 'opspawn.db'}",
                "broker_url": "embedded",
                "llm": fake_llm_profile(llm_url),
                "server": {"grpc_port": grpc_port},
            }
        },
        "<test>",
    )
    config.mcp_servers = {"t": stdio_config(tmp_path)}
    store = open_store(config.opspawn.store_url)
    await store.start()
    try:
        async with Runtime(config, store=store) as runtime:
            ready: asyncio.Queue[str] = asyncio.Queue()
            serve = asyncio.create_task(runtime.serve_http("127.0.0.1", 0, on_ready=ready.put_nowait))
            try:
                yield Served(runtime, store, await ready.get())
            finally:
                serve.cancel()
                with suppress(asyncio.CancelledError):
                    await serve
    finally:
        await store.close()


def assert_task_chain(spans: list[ReadableSpan], door: ReadableSpan) -> ReadableSpan:
    """door -> send -> process -> run -> (chat, execute_tool -> MCP send), one trace; the run."""
    send = one(spans, "send embedded")
    process = one(spans, "process embedded")
    run = one(spans, "run task")
    chats = named(spans, "chat fake-model")
    tool = one(spans, "execute_tool t.echo_meta")
    wire = one(spans, "MCP send tools/call echo_meta")
    assert len(chats) == 2  # the tool call, then the answer
    assert {trace_id(s) for s in [door, send, process, run, *chats, tool, wire]} == {trace_id(door)}
    assert parent_of(send) == span_id(door)
    assert parent_of(process) == span_id(send)
    assert parent_of(run) == span_id(process)
    assert {parent_of(s) for s in [*chats, tool]} == {span_id(run)}
    assert parent_of(wire) == span_id(tool)
    assert (send.kind, process.kind, wire.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.CLIENT)
    task_id = run.attributes and run.attributes[tracing.TASK_ID]
    assert send.attributes and process.attributes
    assert send.attributes[tracing.TASK_ID] == process.attributes[tracing.TASK_ID] == task_id
    assert run.attributes and run.attributes["opspawn.task.status"] == "completed"
    assert [c.attributes and c.attributes["gen_ai.usage.input_tokens"] for c in chats] != [0, 0]
    return wire


async def downstream_meta(store: TaskStore, task_id: str) -> dict[str, str]:
    """The ``_meta`` the testing server's ``echo_meta`` received, from the task's tool result."""
    results = [e for e in await store.events(task_id) if e.kind == "tool_result"]
    meta: dict[str, str] = json.loads(results[0].data["content"])
    return meta


async def test_one_trace_follows_an_mcp_submit_to_the_downstream_server(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.fake.script(tool_call("t__echo_meta"), "the meta came back")
    with recording() as exporter:
        async with serving(tmp_path, fake.base_url) as served:
            async with Client(f"{served.base}/mcp") as client:
                answer = await client.call_tool(
                    "submit_task", {"goal": "show the meta", "servers": ["t"], "wait": WAIT_CAP_S}
                )
            task = answer.structured_content
            assert task is not None and task["status"] == "completed", task
            meta = await downstream_meta(served.store, task["task_id"])
        spans = list(exporter.get_finished_spans())

    door = one(spans, "tools/call submit_task")
    caller = one(spans, "MCP send tools/call submit_task")
    assert door.kind is SpanKind.SERVER and parent_of(door) == span_id(caller)  # W3C context in _meta
    wire = assert_task_chain(spans, door)
    # The downstream server got the context of the call it served (SEP-414), so its own spans
    # would join the trace.
    _, trace_hex, parent_hex, _ = meta["traceparent"].split("-")
    assert (trace_hex, parent_hex) == (format_trace_id(trace_id(door)), format_span_id(span_id(wire)))


async def test_a_rest_submit_continues_the_callers_trace(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    fake.fake.script(tool_call("t__echo_meta"), "the meta came back")
    with recording() as exporter:
        async with serving(tmp_path, fake.base_url) as served, httpx.AsyncClient() as http:
            submitted = await http.post(
                f"{served.base}/v1/tasks",
                json={"goal": "show the meta", "servers": ["t"]},
                headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"},
            )
            assert submitted.status_code == 202, submitted.text
            (task,) = (await served.store.list_tasks()).items
            await until_terminal(served.runtime, task.id)
        spans = list(exporter.get_finished_spans())

    door = one(spans, "POST /v1/tasks")
    assert door.kind is SpanKind.SERVER and door.attributes and door.attributes["http.route"] == "/v1/tasks"
    assert (trace_id(door), parent_of(door)) == (int(caller_trace, 16), int(caller_span, 16))
    assert_task_chain(spans, door)


async def test_a_grpc_submit_continues_the_callers_trace(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    fake.fake.script(tool_call("t__echo_meta"), "the meta came back")
    port = free_port()
    with recording() as exporter:
        async with (
            serving(tmp_path, fake.base_url, grpc_port=port) as served,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub: Any = pb_grpc.TaskServiceStub(channel)  # type: ignore[no-untyped-call]
            request = pb.SubmitTaskRequest(spec=pb.TaskSpec(goal="show the meta", servers=["t"]))
            metadata = (("traceparent", f"00-{caller_trace}-{caller_span}-01"),)
            created = await stub.SubmitTask(request, metadata=metadata)
            await until_terminal(served.runtime, created.id)
        spans = list(exporter.get_finished_spans())

    door = one(spans, f"{SERVICE_NAME}/SubmitTask")
    assert door.kind is SpanKind.SERVER and door.attributes and door.attributes["rpc.method"] == "SubmitTask"
    assert (trace_id(door), parent_of(door)) == (int(caller_trace, 16), int(caller_span, 16))
    assert_task_chain(spans, door)
    assert not [s for s in spans if s.name.startswith("grpc.health")]


async def test_with_tracing_off_opspawn_makes_no_span_even_under_a_global_provider(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.fake.script(tool_call("t__echo_meta"), "the meta came back")
    with recording() as exporter:
        tracing.uninstall()  # the provider stays global, as after a traced block: opspawn is off
        async with serving(tmp_path, fake.base_url) as served, httpx.AsyncClient() as http:
            submitted = await http.post(
                f"{served.base}/v1/tasks", json={"goal": "show the meta", "servers": ["t"]}
            )
            assert submitted.status_code == 202, submitted.text
            (task,) = (await served.store.list_tasks()).items
            await until_terminal(served.runtime, task.id)
        names = {s.name for s in exporter.get_finished_spans()}
    assert not names & {"POST /v1/tasks", "send embedded", "process embedded", "run task", "chat fake-model"}
    assert not any(name.startswith("execute_tool") for name in names)
    assert tracing.outgoing() is None


async def until_terminal(runtime: Runtime, task_id: str) -> None:
    """Follow the task until it ends; the wait's bound only turns a hang into a failure."""
    task = await runtime.service.wait(task_id, HANG_GUARD_S, by=LOCAL)
    assert task.status is TaskStatus.COMPLETED, task
