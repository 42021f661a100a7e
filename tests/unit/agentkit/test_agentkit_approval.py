"""Approval of tool calls: a run pauses before a call a person must approve, and a run on the
journal with the answer added goes on: the call runs once if approved, the model reads the denial
if not. Nothing waits inside the agent."""

from __future__ import annotations

from typing import Any

from agentkit import (
    Agent,
    AgentEvent,
    Approval,
    JournalEntry,
    LLMResponse,
    MemoryJournal,
    RunResult,
    RunStatus,
    Tool,
    ToolCall,
    denial_message,
    tool,
)
from agentkit.llm import ChatRequest, ScriptedLLM


class Deleter:
    """A ``delete`` tool (gated) and a ``look`` tool (not), counting their executions."""

    def __init__(self) -> None:
        self.runs = {"delete": 0, "look": 0}

    def tools(self) -> list[Tool]:
        async def delete(path: str) -> str:
            """Delete a file."""
            self.runs["delete"] += 1
            return f"deleted {path}"

        async def look(path: str) -> str:
            """Look at a file."""
            self.runs["look"] += 1
            return f"{path} is there"

        return [tool(delete), tool(look)]


def delete_then_answer(request: ChatRequest) -> LLMResponse:
    """One step deleting (and looking, when asked for both), then an answer quoting the results."""
    results = [m.content or "" for m in request.messages if m.role == "tool"]
    if results:
        return LLMResponse(content="answer: " + " | ".join(results))
    calls = [ToolCall(id="d", name="delete", arguments={"path": "/tmp/x"})]
    if "both" in (request.messages[-1].content or ""):
        calls.insert(0, ToolCall(id="l", name="look", arguments={"path": "/tmp/x"}))
    return LLMResponse(tool_calls=calls)


def needs_approval(call: ToolCall, _tool: Tool | None) -> bool:
    return call.name == "delete"


class Events:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    async def __call__(self, event: AgentEvent) -> None:
        self.kinds.append(event.kind)


def make_agent(llm: ScriptedLLM, deleter: Deleter, **options: Any) -> Agent:
    return Agent(llm, deleter.tools(), require_approval=needs_approval, **options)


async def paused_run(goal: str = "delete /tmp/x") -> tuple[MemoryJournal, RunResult, Deleter]:
    journal, deleter = MemoryJournal(), Deleter()
    result = await make_agent(ScriptedLLM([delete_then_answer]), deleter).run(goal, journal=journal)
    return journal, result, deleter


def answered(journal: MemoryJournal, result: RunResult, approval: Approval) -> MemoryJournal:
    assert result.pending is not None
    entry = JournalEntry.approval(result.pending.ordinal, result.pending.step, approval)
    return MemoryJournal([*journal.entries, entry])


async def test_a_call_that_needs_approval_pauses_the_run_before_the_tool_runs() -> None:
    events, deleter, journal = Events(), Deleter(), MemoryJournal()
    agent = make_agent(ScriptedLLM([delete_then_answer]), deleter, on_event=events)

    result = await agent.run("delete /tmp/x", journal=journal)

    assert result.status is RunStatus.INPUT_REQUIRED
    assert result.pending is not None
    assert (result.pending.ordinal, result.pending.step) == (1, 1)
    assert result.pending.call.name == "delete" and result.pending.call.arguments == {"path": "/tmp/x"}
    assert deleter.runs == {"delete": 0, "look": 0}
    assert events.kinds == ["llm"]  # no tool_call, and a pause is not an end: no final, no error
    assert [e.kind for e in journal.entries] == ["llm"]


async def test_an_approved_call_runs_once_on_resume_without_asking_the_model_again() -> None:
    journal, paused, deleter = await paused_run()
    llm = ScriptedLLM([delete_then_answer], repeat_last=True)

    result = await make_agent(llm, deleter).run(
        "delete /tmp/x", journal=answered(journal, paused, Approval(approved=True, by="alice"))
    )

    assert result.status is RunStatus.COMPLETED
    assert result.output == "answer: deleted /tmp/x"
    assert deleter.runs["delete"] == 1
    assert len(llm.calls) == 1  # the step that asked for the call was replayed, not re-asked


async def test_a_denied_call_never_runs_and_the_model_reads_who_denied_it_and_why() -> None:
    journal, paused, deleter = await paused_run()
    llm = ScriptedLLM([delete_then_answer], repeat_last=True)
    denial = Approval(approved=False, by="alice", note="that file is needed")

    result = await make_agent(llm, deleter).run("delete /tmp/x", journal=answered(journal, paused, denial))

    assert result.status is RunStatus.COMPLETED
    assert deleter.runs["delete"] == 0
    seen = [m.content for m in llm.calls[0].messages if m.role == "tool"]
    assert seen == [denial_message(denial)]
    assert "denied by alice: that file is needed" in denial_message(denial)


async def test_no_call_of_a_step_runs_before_every_call_of_it_may() -> None:
    journal, paused, deleter = await paused_run("both: look at and delete /tmp/x")

    assert paused.status is RunStatus.INPUT_REQUIRED
    assert paused.pending is not None and paused.pending.ordinal == 2
    assert deleter.runs == {"delete": 0, "look": 0}

    resumed = await make_agent(ScriptedLLM([delete_then_answer], repeat_last=True), deleter).run(
        "both: look at and delete /tmp/x",
        journal=answered(journal, paused, Approval(approved=True)),
    )
    assert resumed.output == "answer: /tmp/x is there | deleted /tmp/x"
    assert deleter.runs == {"delete": 1, "look": 1}


async def test_a_finished_approved_call_is_replayed_on_a_later_resume_not_asked_again() -> None:
    journal, paused, deleter = await paused_run()
    resumed_journal = answered(journal, paused, Approval(approved=True))
    await make_agent(ScriptedLLM([delete_then_answer], repeat_last=True), deleter).run(
        "delete /tmp/x", journal=resumed_journal
    )
    asked: list[str] = []

    async def policy(call: ToolCall, _tool: Tool | None) -> bool:
        asked.append(call.name)
        return True

    again = Agent(ScriptedLLM([]), deleter.tools(), require_approval=policy)
    result = await again.run("delete /tmp/x", journal=resumed_journal)

    assert result.status is RunStatus.COMPLETED and result.output == "answer: deleted /tmp/x"
    assert deleter.runs["delete"] == 1
    assert asked == []


async def test_without_a_policy_nothing_pauses() -> None:
    deleter = Deleter()
    result = await Agent(ScriptedLLM([delete_then_answer], repeat_last=True), deleter.tools()).run(
        "delete /tmp/x"
    )
    assert result.status is RunStatus.COMPLETED and deleter.runs["delete"] == 1
