"""ReAct options and plan-and-execute, driven by ScriptedLLM."""

from __future__ import annotations

from agentkit import (
    Agent,
    PlanAndExecutePlanner,
    ReActPlanner,
    RunStatus,
    ToolError,
    get_planner,
    tool,
)
from agentkit.llm import ScriptedLLM, call
from agentkit.planners import parse_plan
from tests.unit.agentkit.doubles import Recorder


@tool
def lookup(key: str) -> str:
    """Look a key up."""
    table = {"capital": "Paris", "population": "2.1 million"}
    if key not in table:
        raise ToolError(f"unknown key {key!r}; known keys: {', '.join(table)}")
    return table[key]


@tool
def other(x: int) -> int:
    """Another tool."""
    return x


def test_planners_are_chosen_by_name() -> None:
    assert isinstance(get_planner("react"), ReActPlanner)
    assert isinstance(get_planner("plan_and_execute"), PlanAndExecutePlanner)
    planner = ReActPlanner(require_tool_first=True)
    assert get_planner(planner) is planner
    assert isinstance(Agent(ScriptedLLM([]), planner="plan-and-execute").planner, PlanAndExecutePlanner)


async def test_react_can_require_a_tool_on_the_first_step() -> None:
    llm = ScriptedLLM([call("lookup", key="capital"), "Paris"])
    await Agent(llm, [lookup], planner=ReActPlanner(require_tool_first=True)).run("capital?")
    assert llm.calls[0].tool_choice == "lookup"  # the only tool, named: strongest constraint
    assert llm.calls[1].tool_choice == "auto"

    llm = ScriptedLLM([call("lookup", key="capital"), "Paris"])
    await Agent(llm, [lookup, other], planner=ReActPlanner(require_tool_first=True)).run("capital?")
    assert llm.calls[0].tool_choice == "required"


async def test_react_max_tool_rounds_withdraws_tools() -> None:
    llm = ScriptedLLM([call("lookup", key="capital"), "Paris"])
    result = await Agent(llm, [lookup], planner=ReActPlanner(max_tool_rounds=1)).run("capital?")
    assert result.output == "Paris"
    assert llm.calls[1].tool_choice == "none" and llm.calls[1].tools == []


async def test_react_stops_a_model_that_repeats_the_same_call() -> None:
    llm = ScriptedLLM([call("lookup", key="capital"), call("lookup", key="capital"), "Paris"])
    result = await Agent(llm, [lookup]).run("capital?")
    assert result.output == "Paris"
    assert llm.calls[1].tool_choice == "auto"
    assert llm.calls[2].tools == []
    assert "already have that result" in (llm.calls[2].messages[-1].content or "")


def test_parse_plan() -> None:
    assert parse_plan("Plan:\n1. Look up the capital\n2) Answer\nStep 3: done") == [
        "Look up the capital",
        "Answer",
        "done",
    ]
    assert parse_plan("- first\n- second") == ["first", "second"]
    assert parse_plan(None) == []


async def test_plan_and_execute_plans_then_executes_step_by_step() -> None:
    recorder = Recorder()
    llm = ScriptedLLM(
        [
            "1. Look up the capital\n2. Look up the population\n3. Answer",
            call("lookup", key="capital"),
            call("lookup", key="population"),
            "Paris, 2.1 million",
        ]
    )
    result = await Agent(llm, [lookup], planner="plan_and_execute", on_event=recorder).run(
        "Capital of France and its population?"
    )
    assert result.status is RunStatus.COMPLETED and result.output == "Paris, 2.1 million"
    plan_call = llm.calls[0]
    assert plan_call.tools == [] and "numbered plan" in (plan_call.messages[0].content or "")
    assert "lookup" in (plan_call.messages[0].content or "")
    assert recorder.events[0].kind == "plan"
    assert recorder.events[0].data["plan"] == ["Look up the capital", "Look up the population", "Answer"]
    assert llm.calls[1].messages[-1].content == "Carry out step 1: Look up the capital"
    assert "Now carry out step 2: Look up the population" in (llm.calls[2].messages[-1].content or "")
    assert "Now carry out step 3: Answer" in (llm.calls[3].messages[-1].content or "")
    assert result.usage.total_tokens > sum(s.usage.total_tokens for s in result.steps)  # the plan call counts


async def test_plan_and_execute_revises_the_plan_when_a_step_fails() -> None:
    recorder = Recorder()
    llm = ScriptedLLM(
        [
            "1. Look up the country\n2. Answer",
            call("lookup", key="country"),
            "1. Look up the capital\n2. Answer",  # the revision
            call("lookup", key="capital"),
            "Paris",
        ]
    )
    result = await Agent(llm, [lookup], planner="plan_and_execute", on_event=recorder).run("Capital?")
    assert result.output == "Paris"
    revise_call = llm.calls[2]
    assert revise_call.tools == [] and "unknown key 'country'" in (revise_call.messages[0].content or "")
    plans = [e.data for e in recorder.events if e.kind == "plan"]
    assert [p["revision"] for p in plans] == [0, 1]
    assert plans[1]["plan"] == ["Look up the capital", "Answer"]
    assert "Revised plan" in (llm.calls[3].messages[-1].content or "")


async def test_plan_and_execute_treats_early_text_as_a_step_result() -> None:
    llm = ScriptedLLM(["1. Think\n2. Answer", "thinking done", "final"])
    result = await Agent(llm, [lookup], planner="plan_and_execute").run("x")
    assert result.output == "final"
    assert "Now carry out step 2: Answer" in (llm.calls[2].messages[-1].content or "")


@tool
def frozen(query: str) -> str:
    """A tool whose server stopped answering."""
    raise ToolError(f"the server did not answer {query!r} within 5s")


async def test_react_fails_the_run_when_the_repeated_call_kept_failing() -> None:
    # Before: the guard withdrew the tools and the model wrote an answer with no tool result,
    # so a frozen server's tasks ended "completed".
    llm = ScriptedLLM([call("frozen", query="q"), call("frozen", query="q"), "made up"])
    recorder = Recorder()
    result = await Agent(llm, [frozen], on_event=recorder).run("ask")
    assert result.status is RunStatus.FAILED
    assert (result.error or "").startswith(
        "The same call to frozen kept failing (2 identical calls, none succeeded); the last said: "
        "the server did not answer 'q' within 5s."
    )
    assert len(llm.calls) == 2  # no final answer was asked for
    assert recorder.events[-1].kind == "error" and recorder.events[-1].data["error"] == result.error


async def test_react_answers_when_a_repeated_call_had_succeeded_before() -> None:
    outcomes = iter(["Paris", None])

    @tool
    def flaky(key: str) -> str:
        """Works once, then fails."""
        value = next(outcomes)
        if value is None:
            raise ToolError("temporarily unavailable")
        return value

    llm = ScriptedLLM([call("flaky", key="capital"), call("flaky", key="capital"), "Paris"])
    result = await Agent(llm, [flaky]).run("capital?")
    assert result.status is RunStatus.COMPLETED and result.output == "Paris"
    assert result.warnings == []  # one call succeeded


async def test_a_completed_run_whose_every_tool_call_failed_carries_a_warning() -> None:
    recorder = Recorder()
    llm = ScriptedLLM([call("lookup", key="a"), call("lookup", key="b"), "no idea"])
    result = await Agent(llm, [lookup], on_event=recorder).run("look up")
    assert result.status is RunStatus.COMPLETED and result.output == "no idea"
    (warning,) = result.warnings
    assert warning.startswith(
        "every tool call failed; the answer was written without any tool result; the last, lookup, said:"
    )
    assert recorder.events[-1].kind == "final" and recorder.events[-1].data["warnings"] == [warning]

    recorder.events.clear()
    llm = ScriptedLLM([call("lookup", key="a"), call("lookup", key="capital"), "Paris"])
    result = await Agent(llm, [lookup], on_event=recorder).run("look up")
    assert result.warnings == [] and recorder.events[-1].data["warnings"] == []
    result = await Agent(ScriptedLLM(["no tools needed"]), [lookup]).run("hi")
    assert result.warnings == []  # no tool call at all is not a failed one
