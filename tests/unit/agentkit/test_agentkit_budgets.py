"""Per-run budgets with ScriptedLLM: max_tool_calls refuses calls beyond it, max_total_tokens stops
the run after the response that crosses it; both end the run ``failed`` with an ``error`` event."""

from __future__ import annotations

import pytest

from agentkit import Agent, LLMResponse, RunStatus, ToolCall, Usage, tool
from agentkit.llm import ScriptedLLM, call, calls
from tests.unit.agentkit.doubles import Recorder

TOKENS_ERROR = (
    "The run used {used} LLM tokens; its budget (max_total_tokens) is {budget}. "
    "Raise the budget or simplify the goal."
)


class RecordTool:
    """A tool that records each call, so a test can tell which calls really ran."""

    def __init__(self) -> None:
        self.ran: list[int] = []

        @tool
        def record(n: int) -> str:
            """Record n."""
            self.ran.append(n)
            return f"recorded {n}"

        self.tool = record


def used(n: int, *, input_tokens: int, output_tokens: int) -> LLMResponse:
    """A response calling ``record(n)`` that reports this usage."""
    return LLMResponse(
        tool_calls=[ToolCall(id=f"c{n}", name="record", arguments={"n": n})],
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
    )


async def test_a_tool_call_beyond_max_tool_calls_does_not_run_and_fails_the_run() -> None:
    record, events = RecordTool(), Recorder()
    llm = ScriptedLLM([call("record", n=1), call("record", n=2), call("record", n=3), "never asked"])
    result = await Agent(llm, [record.tool], max_tool_calls=2, on_event=events).run("record")
    assert result.status is RunStatus.FAILED
    assert result.error == (
        "The run reached its budget of 2 tool calls (max_tool_calls); the model asked for 1 more, "
        "which did not run. Raise the budget or simplify the goal."
    )
    assert record.ran == [1, 2]  # the refused call did not run
    assert len(llm.calls) == 3  # and the model was not asked again
    refused = result.steps[2].tool_results[0]
    assert refused.is_error and refused.content == (
        "Not run: the run reached its budget of 2 tool calls (max_tool_calls)."
    )
    # The transcript stays valid: the refused call has its result, paired by id.
    assert result.messages[-1].role == "tool" and result.messages[-1].tool_call_id == refused.call_id
    assert [e.data["name"] for e in events.events if e.kind == "tool_call"] == ["record", "record"]
    assert events.kinds()[-1] == "error" and events.events[-1].data["error"] == result.error
    assert events.events[-1].data["status"] == "failed"


async def test_a_turn_of_parallel_calls_runs_only_those_within_the_budget() -> None:
    record = RecordTool()
    llm = ScriptedLLM([calls(("record", {"n": 1}), ("record", {"n": 2}), ("record", {"n": 3}))])
    result = await Agent(llm, [record.tool], max_tool_calls=1).run("record")
    assert record.ran == [1]
    assert result.error == (
        "The run reached its budget of 1 tool call (max_tool_calls); the model asked for 2 more, "
        "which did not run. Raise the budget or simplify the goal."
    )
    assert [(r.content, r.is_error) for r in result.steps[0].tool_results] == [
        ("recorded 1", False),
        ("Not run: the run reached its budget of 1 tool call (max_tool_calls).", True),
        ("Not run: the run reached its budget of 1 tool call (max_tool_calls).", True),
    ]


async def test_using_exactly_the_tool_call_budget_still_completes() -> None:
    record = RecordTool()
    llm = ScriptedLLM([call("record", n=1), call("record", n=2), "two recorded"])
    result = await Agent(llm, [record.tool], max_tool_calls=2).run("record")
    assert result.status is RunStatus.COMPLETED and result.output == "two recorded"
    assert record.ran == [1, 2]


async def test_the_token_budget_stops_the_run_after_the_response_that_exceeds_it() -> None:
    record, events = RecordTool(), Recorder()
    llm = ScriptedLLM(
        [
            used(1, input_tokens=40, output_tokens=10),
            used(2, input_tokens=50, output_tokens=10),  # 110 in all: over 100
            "never asked",
        ]
    )
    result = await Agent(llm, [record.tool], max_total_tokens=100, on_event=events).run("record")
    assert result.status is RunStatus.FAILED
    assert result.error == TOKENS_ERROR.format(used=110, budget=100)
    assert record.ran == [1]  # the over-budget response's tool call did not run
    assert len(llm.calls) == 2
    assert result.usage.total_tokens == 110
    assert result.steps[-1].usage == Usage(input_tokens=50, output_tokens=10)
    assert result.steps[-1].tool_calls == []  # not acted on
    assert events.kinds() == ["llm", "tool_call", "tool_result", "llm", "error"]
    assert events.events[-1].data["error"] == result.error
    assert events.events[-1].data["usage"]["total_tokens"] == 110


async def test_reaching_the_token_budget_exactly_is_within_it() -> None:
    llm = ScriptedLLM([LLMResponse(content="ok", usage=Usage(input_tokens=60, output_tokens=40))])
    result = await Agent(llm, max_total_tokens=100).run("hi")
    assert result.status is RunStatus.COMPLETED and result.usage.total_tokens == 100


async def test_the_token_budget_counts_every_model_call_of_the_run_plans_included() -> None:
    plan = LLMResponse(content="1. record", usage=Usage(input_tokens=90, output_tokens=20))
    llm = ScriptedLLM([plan, "never asked"])
    result = await Agent(llm, [RecordTool().tool], planner="plan_and_execute", max_total_tokens=100).run("go")
    assert result.status is RunStatus.FAILED
    assert result.error == TOKENS_ERROR.format(used=110, budget=100)
    assert len(llm.calls) == 1 and result.steps == []


async def test_the_budgets_are_per_run() -> None:
    record = RecordTool()
    llm = ScriptedLLM([call("record", n=1), "one", call("record", n=2), "two"])
    agent = Agent(llm, [record.tool], max_tool_calls=1, max_total_tokens=1000)
    first, second = await agent.run("a"), await agent.run("b")
    assert (first.status, second.status) == (RunStatus.COMPLETED, RunStatus.COMPLETED)
    assert record.ran == [1, 2]


@pytest.mark.parametrize("value", [0, -1])
def test_a_budget_below_one_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="max_tool_calls must be at least 1, or None for no limit"):
        Agent(ScriptedLLM([]), max_tool_calls=value)
    with pytest.raises(ValueError, match="max_total_tokens must be at least 1, or None for no limit"):
        Agent(ScriptedLLM([]), max_total_tokens=value)
