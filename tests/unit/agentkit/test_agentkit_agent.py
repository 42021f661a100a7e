"""The agent loop with ScriptedLLM: steps, events, usage, limits, cancellation, structured output."""

from __future__ import annotations

import json

import anyio
import pytest
from pydantic import BaseModel

from agentkit import (
    Agent,
    AgentEvent,
    LLMError,
    LLMResponse,
    ReActPlanner,
    RunResult,
    RunStatus,
    ToolCall,
    Usage,
    tool,
)
from agentkit.errors import AgentConfigError
from agentkit.llm import ChatRequest, ScriptedLLM, call, calls
from tests.unit.agentkit.doubles import Recorder


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def test_one_tool_call_then_final_answer_with_usage_summed() -> None:
    llm = ScriptedLLM(
        [
            LLMResponse(
                tool_calls=[ToolCall(id="c1", name="add", arguments={"a": 2, "b": 3})],
                usage=Usage(input_tokens=10, output_tokens=5),
            ),
            LLMResponse(content="The sum is 5.", usage=Usage(input_tokens=20, output_tokens=4)),
        ]
    )
    result = await Agent(llm, [add]).run("What is 2 + 3?")
    assert result.status is RunStatus.COMPLETED and result.ok
    assert result.output == "The sum is 5."
    assert result.usage == Usage(input_tokens=30, output_tokens=9)
    assert result.usage.total_tokens == 39
    assert [s.kind for s in result.steps] == ["act", "final"]
    first = result.steps[0]
    assert first.tool_calls[0].name == "add"
    assert first.tool_results[0].content == "5" and first.tool_results[0].call_id == "c1"
    assert [m.role for m in first.messages] == ["assistant", "tool"]
    # The model saw the tool's result, paired with its call id.
    seen = llm.calls[1].messages
    assert seen[-1].role == "tool" and seen[-1].content == "5" and seen[-1].tool_call_id == "c1"
    assert [t.name for t in llm.calls[0].tools] == ["add"]
    assert [m.role for m in result.messages] == ["system", "user", "assistant", "tool", "assistant"]


async def test_events_are_emitted_in_order_and_json_serialisable() -> None:
    recorder = Recorder()
    llm = ScriptedLLM([call("add", a=1, b=1), "2"])
    await Agent(llm, [add], on_event=recorder).run("1+1?")
    assert [(e.kind, e.step) for e in recorder.events] == [
        ("llm", 1),
        ("tool_call", 1),
        ("tool_result", 1),
        ("llm", 2),
        ("final", 2),
    ]
    for event in recorder.events:
        json.dumps(event.data)
    assert recorder.events[1].data["arguments"] == {"a": 1, "b": 1}
    assert recorder.events[2].data["content"] == "2" and recorder.events[2].data["is_error"] is False
    assert recorder.events[-1].data["output"] == "2" and recorder.events[-1].data["usage"]["total_tokens"] > 0


async def test_a_failing_event_callback_does_not_break_the_run() -> None:
    async def on_event(event: AgentEvent) -> None:
        raise RuntimeError("database down")

    result = await Agent(ScriptedLLM(["fine"]), on_event=on_event).run("hi")
    assert result.status is RunStatus.COMPLETED and result.output == "fine"


async def test_tool_errors_are_observations_the_model_corrects_from() -> None:
    llm = ScriptedLLM([call("add", a="two", b=3), call("add", a=2, b=3), "5"])
    result = await Agent(llm, [add]).run("2+3")
    assert result.output == "5"
    error = result.steps[0].tool_results[0]
    assert error.is_error and "Invalid arguments for tool add" in error.content
    assert llm.calls[1].messages[-1].content == error.content
    assert result.steps[1].tool_results[0].content == "5"


async def test_a_streak_of_tool_errors_fails_the_run_with_the_last_error() -> None:
    llm = ScriptedLLM(
        [call("add", a="x", b=1), call("add", a=2, b=2), call("add", a="y", b=1)], repeat_last=True
    )
    result = await Agent(llm, [add], max_tool_errors=2).run("add")
    # One success between errors resets the streak: the run ends on the 2nd error in a row.
    assert result.status is RunStatus.FAILED
    assert len(result.steps) == 4
    assert (result.error or "").startswith(
        "2 tool calls failed in a row; the last, add, said: Invalid arguments"
    )


async def test_without_a_limit_tool_errors_stay_observations() -> None:
    # Different failing calls each time (the same failing call repeated fails the run: see
    # test_agentkit_planners), so the model keeps going and finally answers, with a warning.
    llm = ScriptedLLM([call("add", a="x", b=1), call("add", a="y", b=1), call("add", a="z", b=1), "gave up"])
    result = await Agent(llm, [add]).run("add")
    assert result.status is RunStatus.COMPLETED and result.output == "gave up"
    (warning,) = result.warnings
    assert warning.startswith(
        "every tool call failed; the answer was written without any tool result; the last, "
    )


async def test_parallel_tool_calls_run_concurrently() -> None:
    a_started, b_started = anyio.Event(), anyio.Event()

    @tool
    async def left() -> str:
        """Waits for right."""
        a_started.set()
        with anyio.fail_after(10):  # only a guard against a hang if calls were sequential
            await b_started.wait()
        return "left"

    @tool
    async def right() -> str:
        """Waits for left."""
        b_started.set()
        with anyio.fail_after(10):
            await a_started.wait()
        return "right"

    llm = ScriptedLLM([calls(("left", {}), ("right", {})), "both"])
    result = await Agent(llm, [left, right]).run("go")
    assert [r.content for r in result.steps[0].tool_results] == ["left", "right"]
    assert not any(r.is_error for r in result.steps[0].tool_results)


async def test_sequential_tool_calls_when_parallel_is_off() -> None:
    order: list[str] = []

    @tool
    async def one() -> str:
        """First."""
        order.append("one start")
        await anyio.sleep(0.01)
        order.append("one end")
        return "1"

    @tool
    async def two() -> str:
        """Second."""
        order.append("two start")
        return "2"

    llm = ScriptedLLM([calls(("one", {}), ("two", {})), "done"])
    await Agent(llm, [one, two], planner=ReActPlanner(parallel_tool_calls=False)).run("go")
    assert order == ["one start", "one end", "two start"]


async def test_max_steps_ends_with_a_final_call_without_tools() -> None:
    counter = iter(range(100))

    def keep_calling(request: ChatRequest) -> LLMResponse:
        if not request.tools:
            return LLMResponse(content="best effort: 42")
        return call("add", a=next(counter), b=1)

    llm = ScriptedLLM([keep_calling], repeat_last=True)
    result = await Agent(llm, [add], max_steps=3).run("loop")
    assert result.status is RunStatus.COMPLETED
    assert result.output == "best effort: 42"
    assert len(llm.calls) == 4
    assert llm.calls[-1].tools == [] and llm.calls[-1].tool_choice == "none"
    assert "used all 3 steps" in (llm.calls[-1].messages[-1].content or "")
    assert [s.kind for s in result.steps] == ["act", "act", "act", "forced_final"]


async def test_no_answer_even_after_max_steps_fails_with_a_reason() -> None:
    llm = ScriptedLLM([call("add", a=1, b=1), call("add", a=1, b=2), ""])
    result = await Agent(llm, [add], max_steps=2).run("x")
    assert result.status is RunStatus.FAILED
    assert "max_steps=2" in (result.error or "")


async def test_empty_replies_get_a_nudge_instead_of_ending_the_run() -> None:
    llm = ScriptedLLM([LLMResponse(content=None), "answer"])
    result = await Agent(llm).run("x")
    assert result.output == "answer"
    assert "empty" in (llm.calls[1].messages[-1].content or "")


async def test_llm_failure_fails_the_run_with_the_reason_and_keeps_steps() -> None:
    llm = ScriptedLLM([call("add", a=1, b=2), LLMError("server down; check it")])
    result = await Agent(llm, [add]).run("x")
    assert result.status is RunStatus.FAILED
    assert result.error == "server down; check it"
    assert len(result.steps) == 2 and result.steps[0].tool_results[0].content == "3"


async def test_internal_errors_are_data_too() -> None:
    def broken(request: ChatRequest) -> LLMResponse:
        raise ValueError("bug")

    result = await Agent(ScriptedLLM([broken])).run("x")
    assert result.status is RunStatus.FAILED and "ValueError: bug" in (result.error or "")


async def test_timeout_ends_the_run_timed_out() -> None:
    @tool
    async def hang() -> str:
        """Never returns."""
        await anyio.sleep_forever()
        return ""

    recorder = Recorder()
    result = await Agent(ScriptedLLM([call("hang")]), [hang], timeout_s=0.2, on_event=recorder).run("x")
    assert result.status is RunStatus.TIMED_OUT
    assert "timeout_s=0.2" in (result.error or "")
    assert recorder.events[-1].kind == "error" and recorder.events[-1].data["status"] == "timed_out"
    assert len(result.steps) == 1


async def run_then_cancel(agent: Agent, started: anyio.Event) -> RunResult:
    """Run ``agent`` and cancel it from outside once ``started`` is set; the run's result."""
    results: list[RunResult] = []

    async def runner() -> None:
        results.append(await agent.run("x"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner)
        await started.wait()
        agent.cancel()
    return results[0]


async def test_cancel_during_a_tool_call() -> None:
    started = anyio.Event()

    @tool
    async def slow() -> str:
        """Blocks until cancelled."""
        started.set()
        await anyio.sleep_forever()
        return ""

    result = await run_then_cancel(Agent(ScriptedLLM([call("slow"), "never"]), [slow]), started)
    assert result.status is RunStatus.CANCELLED
    assert result.steps[0].tool_calls[0].name == "slow"


async def test_cancel_during_a_model_call() -> None:
    entered = anyio.Event()

    async def wait_forever(request: ChatRequest) -> LLMResponse:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError

    result = await run_then_cancel(Agent(ScriptedLLM([wait_forever])), entered)
    assert result.status is RunStatus.CANCELLED


async def test_cancel_between_steps_stops_before_the_next_model_call() -> None:
    agent: Agent

    async def on_event(event: AgentEvent) -> None:
        if event.kind == "tool_result":
            agent.cancel()

    llm = ScriptedLLM([call("add", a=1, b=2), "never asked"])
    agent = Agent(llm, [add], on_event=on_event)
    result = await agent.run("x")
    assert result.status is RunStatus.CANCELLED
    assert len(llm.calls) == 1
    assert result.steps[0].tool_results[0].content == "3"


async def test_cancel_before_the_run_starts_cancels_it() -> None:
    llm = ScriptedLLM(["answer"])
    agent = Agent(llm)
    agent.cancel()
    assert (await agent.run("x")).status is RunStatus.CANCELLED
    assert llm.calls == []
    # The pending cancel is used up; the agent works again.
    assert (await agent.run("x")).status is RunStatus.COMPLETED


async def test_tool_timeout_turns_a_slow_tool_into_an_error_observation() -> None:
    @tool
    async def slow() -> str:
        """Too slow."""
        await anyio.sleep_forever()
        return ""

    result = await Agent(ScriptedLLM([call("slow"), "gave up"]), [slow], tool_timeout_s=0.05).run("x")
    assert result.output == "gave up"
    assert result.steps[0].tool_results[0].is_error
    assert "did not finish" in result.steps[0].tool_results[0].content


class Weather(BaseModel):
    city: str
    celsius: float


async def test_structured_output_is_validated() -> None:
    llm = ScriptedLLM(['```json\n{"city": "Oslo", "celsius": -3.5}\n```'])
    result = await Agent(llm, output_type=Weather).run("weather in Oslo")
    assert result.status is RunStatus.COMPLETED
    assert result.data == Weather(city="Oslo", celsius=-3.5)
    assert '"celsius"' in (llm.calls[0].messages[0].content or "")  # the schema was in the prompt
    assert json.loads(result.model_dump_json())["data"] == {"city": "Oslo", "celsius": -3.5}


async def test_structured_output_gets_one_retry_with_the_validation_error() -> None:
    llm = ScriptedLLM(['{"city": "Oslo"}', '{"city": "Oslo", "celsius": 1}'])
    result = await Agent(llm, output_type=Weather).run("weather")
    assert result.status is RunStatus.COMPLETED and result.data == Weather(city="Oslo", celsius=1)
    retry_prompt = llm.calls[1].messages[-1].content or ""
    assert "celsius: Field required" in retry_prompt
    assert llm.calls[1].tools == []
    assert [s.kind for s in result.steps] == ["final", "output_retry"]


async def test_structured_output_failing_twice_fails_the_run() -> None:
    result = await Agent(ScriptedLLM(["not json", "still not"]), output_type=Weather).run("weather")
    assert result.status is RunStatus.FAILED
    assert "did not match Weather after one retry" in (result.error or "")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(AgentConfigError):
        Agent(ScriptedLLM([]), max_steps=0)
    with pytest.raises(AgentConfigError):
        Agent(ScriptedLLM([]), timeout_s=0)
    with pytest.raises(AgentConfigError):
        Agent(ScriptedLLM([]), max_tool_errors=0)
    with pytest.raises(AgentConfigError, match="Unknown planner"):
        Agent(ScriptedLLM([]), planner="tree_of_thought")
