"""The step journal: a run records its facts, and a restarted run replays them instead of redoing them.

Crashes are simulated by a journal that kills the run (a ``BaseException``, as uncatchable by
the agent as a SIGKILL is) right after it stored an entry, or while it was storing one (the fact
happened, its entry was lost). The counts of model calls and tool executions over crash+resume
are compared with a crash-free run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from agentkit import (
    IDEMPOTENCY_META_KEY,
    INTERRUPTED_MESSAGE,
    Agent,
    AgentEvent,
    JournalEntry,
    JournalError,
    LLMResponse,
    MemoryJournal,
    PlanAndExecutePlanner,
    RunStatus,
    Tool,
    ToolCall,
    Usage,
    current_call_key,
    tool,
)
from agentkit.llm import ChatRequest, ScriptedLLM, calls
from tests.unit.agentkit.doubles import Recorder

USAGE = Usage(input_tokens=10, output_tokens=5)
CRASH_FREE_OUTPUT = "done: first 1 | second 2"


class Killed(BaseException):
    """The process died: nothing in the agent may catch it."""


class CrashingJournal(MemoryJournal):
    """Dies at the ``at``-th append: after storing it (``after``) or before (``during``)."""

    def __init__(self, at: int, mode: Literal["after", "during"]) -> None:
        super().__init__()
        self.at = at
        self.mode = mode
        self.appends = 0

    async def append(self, entry: JournalEntry) -> None:
        self.appends += 1
        if self.appends == self.at and self.mode == "during":
            raise Killed
        await super().append(entry)
        if self.appends == self.at:
            raise Killed


def two_tool_script(request: ChatRequest) -> LLMResponse | str:
    """Answers from the request alone, so a fresh ScriptedLLM continues a resumed run correctly."""
    results = [m for m in request.messages if m.role == "tool"]
    if not results:
        return LLMResponse(tool_calls=[ToolCall(id="c1", name="first", arguments={"x": 1})], usage=USAGE)
    if len(results) == 1:
        return LLMResponse(tool_calls=[ToolCall(id="c2", name="second", arguments={"x": 2})], usage=USAGE)
    return LLMResponse(content="done: " + " | ".join(m.content or "" for m in results), usage=USAGE)


def counting_llm() -> ScriptedLLM:
    return ScriptedLLM([two_tool_script], repeat_last=True)


@dataclass
class Counting:
    """Two tools that count their executions and record the call key they ran under."""

    idempotent: bool | None = None
    runs: dict[str, int] = field(default_factory=lambda: {"first": 0, "second": 0})
    keys: dict[str, list[str | None]] = field(default_factory=lambda: {"first": [], "second": []})

    def tools(self) -> list[Tool]:
        async def first(x: int) -> str:
            """The first tool."""
            self.runs["first"] += 1
            self.keys["first"].append(current_call_key())
            return f"first {x}"

        async def second(x: int) -> str:
            """The second tool."""
            self.runs["second"] += 1
            self.keys["second"].append(current_call_key())
            return f"second {x}"

        return [tool(first, idempotent=self.idempotent), tool(second, idempotent=self.idempotent)]


def agent(llm: ScriptedLLM, counting: Counting, **options: Any) -> Agent:
    return Agent(llm, counting.tools(), **options)


async def crash_free_journal() -> tuple[MemoryJournal, Any]:
    journal = MemoryJournal()
    result = await agent(counting_llm(), Counting()).run("go", journal=journal, run_id="task-7")
    assert result.status is RunStatus.COMPLETED and result.output == CRASH_FREE_OUTPUT
    return journal, result


async def test_a_fresh_run_records_every_fact_in_order() -> None:
    journal, result = await crash_free_journal()
    entries = journal.entries
    assert [(e.kind, e.ordinal, e.step) for e in entries] == [
        ("llm", 1, 1),
        ("tool_started", 1, 1),
        ("tool_finished", 1, 1),
        ("llm", 2, 2),
        ("tool_started", 2, 2),
        ("tool_finished", 2, 2),
        ("llm", 3, 3),
    ]
    assert [e.key for e in entries] == ["llm:1", "tool:1", "tool:1", "llm:2", "tool:2", "tool:2", "llm:3"]
    llm1 = entries[0]
    assert set(llm1.data) >= {"content", "tool_calls", "usage", "finish_reason"}
    assert llm1.response().tool_calls == result.steps[0].tool_calls
    assert llm1.response().usage == USAGE
    assert entries[1].call() == result.steps[0].tool_calls[0]
    assert entries[2].result() == result.steps[0].tool_results[0]
    assert entries[6].response().content == CRASH_FREE_OUTPUT
    # Entries are plain JSON: a store can write them as they are and read them back.
    assert [JournalEntry.model_validate_json(e.model_dump_json()) for e in entries] == entries


async def test_each_entry_is_appended_before_the_event_that_announces_it() -> None:
    log: list[str] = []

    class LoggingJournal(MemoryJournal):
        async def append(self, entry: JournalEntry) -> None:
            log.append(f"entry {entry.kind}:{entry.ordinal}")
            await super().append(entry)

    async def on_event(event: AgentEvent) -> None:
        log.append(f"event {event.kind}")

    counting = Counting()
    await agent(counting_llm(), counting, on_event=on_event).run("go", journal=LoggingJournal())
    assert log == [
        "entry llm:1",
        "event llm",
        "entry tool_started:1",
        "event tool_call",
        "entry tool_finished:1",
        "event tool_result",
        "entry llm:2",
        "event llm",
        "entry tool_started:2",
        "event tool_call",
        "entry tool_finished:2",
        "event tool_result",
        "entry llm:3",
        "event llm",
        "event final",
    ]


async def test_a_complete_journal_replays_the_run_without_any_model_or_tool_call() -> None:
    journal, first = await crash_free_journal()
    recorded = list(journal.entries)
    llm = ScriptedLLM([])  # any model call would fail the run
    counting = Counting()
    recorder = Recorder()
    again = await agent(llm, counting, on_event=recorder).run("go", journal=journal, run_id="task-7")
    assert again.status is RunStatus.COMPLETED and again.output == first.output
    assert llm.calls == [] and counting.runs == {"first": 0, "second": 0}
    assert [s.model_dump() for s in again.steps] == [s.model_dump() for s in first.steps]
    assert again.usage == first.usage and again.usage.total_tokens == 3 * USAGE.total_tokens
    assert again.messages == first.messages
    assert journal.entries == recorded  # nothing new to record
    assert recorder.kinds() == ["final"]  # replayed facts are not announced again


ENTRIES = [
    "llm:1",
    "tool_started:1",
    "tool_finished:1",
    "llm:2",
    "tool_started:2",
    "tool_finished:2",
    "llm:3",
]
BOUNDARIES = [("after", n) for n in range(1, 8)] + [
    ("during", n) for n in range(1, 8) if not ENTRIES[n - 1].startswith("tool_started")
]


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "not-idempotent"])
@pytest.mark.parametrize(("mode", "at"), BOUNDARIES, ids=[f"{m}-{ENTRIES[n - 1]}" for m, n in BOUNDARIES])
async def test_a_run_killed_at_any_boundary_resumes_without_redoing_finished_work(
    mode: Literal["after", "during"], at: int, idempotent: bool
) -> None:
    counting = Counting(idempotent=idempotent)
    crashed_llm = counting_llm()
    journal = CrashingJournal(at, mode)
    with pytest.raises(Killed):
        await agent(crashed_llm, counting).run("go", journal=journal, run_id="task-7")
    stored = [f"{e.kind}:{e.ordinal}" for e in journal.entries]
    assert stored == ENTRIES[: at if mode == "after" else at - 1]

    resumed_llm = counting_llm()
    recorder = Recorder()
    resume_journal = MemoryJournal(journal.entries)
    result = await agent(resumed_llm, counting, on_event=recorder).run(
        "go", journal=resume_journal, run_id="task-7"
    )
    assert result.status is RunStatus.COMPLETED
    assert [f"{e.kind}:{e.ordinal}" for e in resume_journal.entries] == ENTRIES

    # Model calls: the crash-free run's 3, plus the one whose response was lost in the crash.
    lost_llm = mode == "during" and ENTRIES[at - 1].startswith("llm")
    assert len(crashed_llm.calls) + len(resumed_llm.calls) == 3 + lost_llm
    # Tool executions: once each, except a call left in flight (started, not finished): re-run
    # once if idempotent, never if not (the model is told instead).
    interrupted = stored[-1].split(":")[1] if stored and stored[-1].startswith("tool_started") else None
    for ordinal, name in (("1", "first"), ("2", "second")):
        if interrupted == ordinal:
            ran_in_crash = 1 if mode == "during" else 0
            assert counting.runs[name] == ran_in_crash + (1 if idempotent else 0)
        else:
            assert counting.runs[name] == 1
    if interrupted is not None and not idempotent:
        assert INTERRUPTED_MESSAGE in (result.output or "")
        assert result.steps[int(interrupted) - 1].tool_results[0].is_error
    else:
        assert result.output == CRASH_FREE_OUTPUT

    # The steps and usage are the whole run's, replayed part included.
    assert len(result.steps) == 3 and [len(s.tool_results) for s in result.steps] == [1, 1, 0]
    assert result.usage.total_tokens == 3 * USAGE.total_tokens
    # Only fresh facts are announced.
    kinds = recorder.kinds()
    assert kinds.count("llm") == len(resumed_llm.calls)
    fresh = resume_journal.entries[len(journal.entries) :]
    assert kinds.count("tool_call") == sum(e.kind == "tool_started" for e in fresh)
    assert kinds.count("tool_result") == sum(e.kind == "tool_finished" for e in fresh)
    # A call's key is the same in every run that executes it.
    assert all(k == "task-7:1:1" for k in counting.keys["first"])
    assert all(k == "task-7:2:2" for k in counting.keys["second"])


async def test_an_interrupted_call_is_told_to_the_model_once_and_journaled() -> None:
    full, _ = await crash_free_journal()
    asked: list[tuple[str, str | None]] = []

    def never(call: ToolCall, found: Tool | None) -> bool:
        asked.append((call.name, found.name if found is not None else None))
        return False

    journal = MemoryJournal(full.entries[:2])  # tool 1 started, never finished
    counting, recorder = Counting(idempotent=True), Recorder()
    result = await agent(counting_llm(), counting, on_event=recorder, rerun_interrupted=never).run(
        "go", journal=journal
    )
    assert asked == [("first", "first")]
    assert counting.runs == {"first": 0, "second": 1}  # the policy overrides the tool's idempotency
    interrupted = result.steps[0].tool_results[0]
    assert interrupted.is_error and interrupted.content == INTERRUPTED_MESSAGE
    assert interrupted.content == (
        "This call was interrupted (the run was restarted while it was in flight); its effect is "
        "unknown. Check before repeating it."
    )
    assert journal.entries[2].kind == "tool_finished" and journal.entries[2].result() == interrupted
    # Announced as a result (its tool_call event was emitted by the run that started it).
    assert recorder.kinds()[:2] == ["tool_result", "llm"]
    assert recorder.events[0].data["content"] == INTERRUPTED_MESSAGE
    # A second restart replays the recorded observation and does not ask again.
    again = await agent(ScriptedLLM([]), Counting(), rerun_interrupted=never).run("go", journal=journal)
    assert again.output == result.output and asked == [("first", "first")]


async def test_the_rerun_policy_may_be_async_and_sees_the_call_and_the_tool() -> None:
    full, _ = await crash_free_journal()
    seen: list[ToolCall] = []

    async def always(call: ToolCall, found: Tool | None) -> bool:
        seen.append(call)
        return found is not None and found.idempotent is False

    counting = Counting(idempotent=False)
    result = await agent(counting_llm(), counting, rerun_interrupted=always).run(
        "go", journal=MemoryJournal(full.entries[:5])
    )
    assert [c.name for c in seen] == ["second"] and seen[0].arguments == {"x": 2}
    assert counting.runs == {"first": 0, "second": 1}
    assert result.output == CRASH_FREE_OUTPUT


async def test_without_a_run_id_each_run_keys_its_calls_with_its_own_uuid() -> None:
    counting = Counting()
    await agent(counting_llm(), counting).run("go")
    await agent(counting_llm(), counting).run("go")
    keys = counting.keys["first"] + counting.keys["second"]
    assert all(k is not None for k in keys)
    prefixes = [str(k).rsplit(":", 2)[0] for k in keys]
    assert prefixes[0] == prefixes[2] and prefixes[1] == prefixes[3] and prefixes[0] != prefixes[1]
    assert len(prefixes[0]) == 32 and int(prefixes[0], 16) >= 0  # a uuid4's hex
    assert [str(k).split(":", 1)[1] for k in keys] == ["1:1", "1:1", "2:2", "2:2"]
    assert current_call_key() is None  # only while a tool runs
    assert IDEMPOTENCY_META_KEY == "io.opspawn/idempotency-key"


async def test_replayed_usage_counts_toward_max_total_tokens() -> None:
    full, _ = await crash_free_journal()
    # Fully replayed: the budget is crossed by recorded responses alone, with no model call.
    llm = ScriptedLLM([])
    replayed = await agent(llm, Counting(), max_total_tokens=20).run(
        "go", journal=MemoryJournal(full.entries)
    )
    assert replayed.status is RunStatus.FAILED and llm.calls == []
    assert "used 30 LLM tokens" in (replayed.error or "")
    # Partly replayed: one recorded response (15) plus one fresh one (15) is over 20, though the
    # fresh call alone is within it.
    llm = counting_llm()
    counting = Counting()
    partial = await agent(llm, counting, max_total_tokens=20).run(
        "go", journal=MemoryJournal(full.entries[:3])
    )
    assert partial.status is RunStatus.FAILED and len(llm.calls) == 1
    assert "used 30 LLM tokens" in (partial.error or "") and counting.runs["second"] == 0


def plan_script(request: ChatRequest) -> LLMResponse | str:
    system = request.messages[0].content or ""
    if system.startswith("You plan"):
        return LLMResponse(content="1. Call first\n2. Call second\n3. Answer", usage=USAGE)
    return two_tool_script(request)


async def test_plan_and_execute_resumes_without_planning_again() -> None:
    crashed_llm = ScriptedLLM([plan_script], repeat_last=True)
    counting = Counting()
    journal = CrashingJournal(4, "after")  # llm:1 (the plan), llm:2, tool_started:1, tool_finished:1
    with pytest.raises(Killed):
        await Agent(crashed_llm, counting.tools(), planner="plan_and_execute").run("go", journal=journal)
    assert [f"{e.kind}:{e.ordinal}" for e in journal.entries] == [
        "llm:1",
        "llm:2",
        "tool_started:1",
        "tool_finished:1",
    ]
    assert journal.entries[0].step == 0  # planned before the first step

    resumed_llm, recorder = ScriptedLLM([plan_script], repeat_last=True), Recorder()
    result = await Agent(
        resumed_llm, counting.tools(), planner=PlanAndExecutePlanner(), on_event=recorder
    ).run("go", journal=MemoryJournal(journal.entries))
    assert result.status is RunStatus.COMPLETED and result.output == CRASH_FREE_OUTPUT
    assert not any((c.messages[0].content or "").startswith("You plan") for c in resumed_llm.calls)
    assert len(crashed_llm.calls) + len(resumed_llm.calls) == 4  # the plan and three steps
    assert counting.runs == {"first": 1, "second": 1}
    assert "plan" not in recorder.kinds()  # derived from a replayed fact: emitted the first time
    # The transcript has the plan, as a fresh run's would.
    assert any((m.content or "").startswith("Plan:\n1. Call first") for m in result.messages)


async def test_parallel_calls_take_ordinals_in_the_models_order() -> None:
    def script(request: ChatRequest) -> LLMResponse | str:
        if not any(m.role == "tool" for m in request.messages):
            return calls(("second", {"x": 2}), ("first", {"x": 1}))
        return "done"

    journal = MemoryJournal()
    counting = Counting()
    await agent(ScriptedLLM([script], repeat_last=True), counting).run("go", journal=journal, run_id="r")
    started = {e.ordinal: e.call().name for e in journal.entries if e.kind == "tool_started"}
    finished = {e.ordinal: e.result().name for e in journal.entries if e.kind == "tool_finished"}
    assert started == finished == {1: "second", 2: "first"}
    assert counting.keys == {"first": ["r:1:2"], "second": ["r:1:1"]}
    # Resumed with both started, one finished: only the unfinished one is decided and run.
    prefix = [e for e in journal.entries if not (e.kind == "tool_finished" and e.ordinal == 2)]
    prefix = [e for e in prefix if e.key != "llm:2"]
    counting = Counting(idempotent=True)
    result = await agent(ScriptedLLM([script], repeat_last=True), counting).run(
        "go", journal=MemoryJournal(prefix), run_id="r"
    )
    assert counting.runs == {"first": 1, "second": 0} and counting.keys["first"] == ["r:1:2"]
    assert [r.content for r in result.steps[0].tool_results] == ["second 2", "first 1"]


async def test_a_journal_that_cannot_be_written_stops_the_run_with_journal_error() -> None:
    class BrokenJournal(MemoryJournal):
        async def append(self, entry: JournalEntry) -> None:
            raise ConnectionError("the store is down")

    recorder, counting = Recorder(), Counting()
    with pytest.raises(JournalError, match=r"Appending llm:1 \(llm\).*ConnectionError: the store is down"):
        await agent(counting_llm(), counting, on_event=recorder).run("go", journal=BrokenJournal())
    assert counting.runs == {"first": 0, "second": 0}
    assert recorder.kinds() == []  # not failed: the run is to be resumed once the store is back


async def test_a_journal_that_does_not_match_the_run_is_refused() -> None:
    llm_entry = JournalEntry.of(
        "llm", 1, 1, LLMResponse(tool_calls=[ToolCall(id="c1", name="first", arguments={"x": 1})])
    )
    other_call = JournalEntry.of("tool_started", 1, 1, ToolCall(id="c1", name="second", arguments={"x": 1}))
    counting = Counting()
    with pytest.raises(JournalError, match="does not match this run: tool call 1 was recorded as 'second'"):
        await agent(ScriptedLLM([]), counting).run("go", journal=MemoryJournal([llm_entry, other_call]))
    assert counting.runs == {"first": 0, "second": 0}
    malformed = JournalEntry(kind="llm", ordinal=1, step=1, data={"tool_calls": "nope"})
    with pytest.raises(JournalError, match=r"entry llm:1 .* is not valid"):
        await agent(ScriptedLLM([]), counting).run("go", journal=MemoryJournal([malformed]))
