"""Progress of long tool calls becomes ``progress`` agent events: from a real in-process MCP
server's ``notifications/progress`` (mcp.Client), and from plain tools via ``report_progress``."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from mcp import Client
from mcp.server.mcpserver import Context, MCPServer

from agentkit import (
    Agent,
    RunStatus,
    expand_server_tools,
    mcp_proxy_tool,
    report_progress,
    tool,
)
from agentkit.llm import ScriptedLLM, call
from agentkit.progress import ToolProgress
from tests.support.callers import OldCaller
from tests.unit.agentkit import doubles
from tests.unit.agentkit.doubles import Recorder, SessionCaller

worker = MCPServer("worker", log_level="WARNING")


@worker.tool(description="Do some work in steps, reporting progress after each.")
async def work(steps: int, ctx: Context) -> str:
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"step {i + 1} of {steps}")
    return f"did {steps} steps"


def open_caller() -> AbstractAsyncContextManager[SessionCaller]:
    return doubles.open_caller({"worker": worker})


async def test_downstream_progress_becomes_progress_events_in_order() -> None:
    async with open_caller() as caller:
        tools = await expand_server_tools(caller, ["worker"])
        recorder = Recorder()
        llm = ScriptedLLM([call("worker__work", steps=4), "done"])
        agent = Agent(llm, tools, on_event=recorder, progress_interval_s=0)
        result = await agent.run("work 4 steps")
    assert result.status is RunStatus.COMPLETED
    assert caller.calls and caller.calls[0].progress_callback is not None
    progress = recorder.progress()
    assert [(p["progress"], p["total"]) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert progress[-1]["message"] == "step 4 of 4"
    assert {p["tool"] for p in progress} == {"worker__work"}
    call_id = result.steps[0].tool_calls[0].id
    assert {p["call_id"] for p in progress} == {call_id}
    assert all(e.step == 1 for e in recorder.events if e.kind == "progress")
    kinds = recorder.kinds()
    # every progress event lies between its tool call and its result
    assert kinds.index("tool_call") < kinds.index("progress")
    assert max(i for i, k in enumerate(kinds) if k == "progress") < kinds.index("tool_result")


async def test_the_throttle_keeps_the_first_and_the_last_report() -> None:
    async with open_caller() as caller:
        tools = [mcp_proxy_tool(caller)]
        recorder = Recorder()
        llm = ScriptedLLM(
            [call("mcp_proxy_tool", server="worker", tool="work", arguments={"steps": 50}), "done"]
        )
        # An interval far longer than the call: only the first report and the held-back last one.
        agent = Agent(llm, tools, on_event=recorder, progress_interval_s=3600)
        result = await agent.run("work")
    assert result.status is RunStatus.COMPLETED
    assert [(p["progress"], p["total"]) for p in recorder.progress()] == [(1, 50), (50, 50)]
    assert {p["tool"] for p in recorder.progress()} == {"mcp_proxy_tool"}


async def test_a_caller_without_the_progress_keyword_still_works() -> None:
    async with Client(worker) as client:
        tools = await expand_server_tools(OldCaller(client), ["worker"])
        recorder = Recorder()
        llm = ScriptedLLM([call("worker__work", steps=3), "done"])
        result = await Agent(llm, tools, on_event=recorder).run("work")
    assert result.status is RunStatus.COMPLETED
    assert result.steps[0].tool_results[0].content == "did 3 steps"
    assert recorder.progress() == []


@tool
async def crunch(n: int) -> str:
    """Crunch n items, reporting progress."""
    for i in range(n):
        await report_progress(i + 1, n, None)
    return "crunched"


async def test_plain_tools_report_progress_and_outside_a_run_it_is_a_no_op() -> None:
    await report_progress(1, 2, "nobody listens")  # no agent: nothing happens, nothing fails
    recorder = Recorder()
    llm = ScriptedLLM([call("crunch", n=3), "done"])
    result = await Agent(llm, [crunch], on_event=recorder, progress_interval_s=0).run("crunch 3")
    assert result.status is RunStatus.COMPLETED
    assert [(p["tool"], p["progress"], p["total"]) for p in recorder.progress()] == [
        ("crunch", 1, 3),
        ("crunch", 2, 3),
        ("crunch", 3, 3),
    ]


async def test_attached_fields_are_emitted_at_once_and_ride_on_every_later_report() -> None:
    seen: list[dict[str, Any]] = []

    async def emit(data: dict[str, Any]) -> None:
        seen.append(data)

    sink = ToolProgress(emit, tool="b__submit_task", call_id="c1", interval_s=3600)
    await sink(1, None, "first")
    await sink.attach("sub-task created", subtask={"server": "b", "task_id": "t1"})  # not throttled
    await sink(2, None, "held back by the throttle")
    await sink.finish()
    assert [d["message"] for d in seen] == ["first", "sub-task created", "held back by the throttle"]
    assert "subtask" not in seen[0]
    assert all(d["subtask"] == {"server": "b", "task_id": "t1"} for d in seen[1:])
    assert seen[1]["progress"] == 1  # the attach repeats the last progress value
