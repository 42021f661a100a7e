"""Token-budgeted memories: whole turns dropped, tool calls never split from results, summaries."""

from __future__ import annotations

from agentkit import Agent, BufferMemory, SummaryMemory, tool
from agentkit.llm import ChatRequest, Message, ScriptedLLM, ToolCall, call
from agentkit.memory import group_turns


def transcript(turns: int) -> list[Message]:
    messages = [Message.system("sys"), Message.user("goal")]
    for i in range(turns):
        messages.append(
            Message.assistant(
                None,
                [
                    ToolCall(id=f"a{i}", name="t", arguments={"i": i}),
                    ToolCall(id=f"b{i}", name="t", arguments={}),
                ],
            )
        )
        messages.append(Message.tool(f"a{i}", "t", f"result a{i} " + "x" * 40))
        messages.append(Message.tool(f"b{i}", "t", f"result b{i} " + "x" * 40))
    return messages


def test_group_turns_keeps_calls_with_their_results() -> None:
    groups = group_turns(transcript(2)[2:])
    assert [[m.role for m in g] for g in groups] == [["assistant", "tool", "tool"]] * 2


async def test_buffer_memory_drops_oldest_whole_turns_within_budget() -> None:
    memory = BufferMemory(max_tokens=100)
    full = transcript(5)
    window = await memory.window(full, llm=ScriptedLLM([]))
    assert window[:2] == full[:2]  # system prompt and goal are pinned
    assert len(window) < len(full)
    assert memory.cost(window) <= 100
    rest = window[2:]
    assert rest[0].role == "assistant"  # never starts with an orphaned tool result
    ids = {c.id for m in rest for c in m.tool_calls}
    assert all(m.tool_call_id in ids for m in rest if m.role == "tool")
    assert rest == full[-len(rest) :]  # the newest turns survive


async def test_buffer_memory_keeps_the_newest_turn_even_over_budget() -> None:
    full = transcript(1)
    window = await BufferMemory(max_tokens=5).window(full, llm=ScriptedLLM([]))
    assert window == full


async def test_token_counter_is_pluggable() -> None:
    seen: list[str] = []

    def words(text: str) -> int:
        seen.append(text)
        return len(text.split())

    full = transcript(5)
    by_words = await BufferMemory(max_tokens=60, counter=words).window(full, llm=ScriptedLLM([]))
    by_chars = await BufferMemory(max_tokens=60).window(full, llm=ScriptedLLM([]))
    assert seen
    assert len(by_words) > len(by_chars)


async def test_summary_memory_folds_dropped_turns_into_a_running_summary() -> None:
    summarizer = ScriptedLLM(["summary one", "summary two"])
    memory = SummaryMemory(max_tokens=220, summary_words=20, llm=summarizer)
    full = transcript(6)
    window = await memory.window(full, llm=ScriptedLLM([]))
    assert window[:2] == full[:2]
    assert window[2].role == "system" and window[2].content == "Summary of earlier steps: summary one"
    assert window[3].role == "assistant"
    assert len(summarizer.calls) == 1
    folded = summarizer.calls[0].messages[1].content or ""
    assert "result a0" in folded
    assert summarizer.calls[0].tool_choice == "none"

    # Same transcript again: nothing new dropped, no new summary call.
    await memory.window(full, llm=ScriptedLLM([]))
    assert len(summarizer.calls) == 1
    # More turns: only the newly dropped ones are folded, into the previous summary.
    window = await memory.window(transcript(9), llm=ScriptedLLM([]))
    assert len(summarizer.calls) == 2
    second = summarizer.calls[1].messages[1].content or ""
    assert "Earlier summary: summary one" in second and "result a0" not in second
    assert window[2].content == "Summary of earlier steps: summary two"


async def test_agent_sends_the_memory_window_and_counts_summary_usage() -> None:
    @tool
    def fetch(page: int) -> str:
        """Fetch a page."""
        return f"page {page} " + "words " * 30

    def script(request: ChatRequest) -> str:
        if request.messages[0].content and request.messages[0].content.startswith("Summarise"):
            return "pages were fetched"
        return "unused"

    responses = [call("fetch", page=i) for i in range(6)]
    llm = ScriptedLLM([*responses, "done"])
    summaries = ScriptedLLM([script], repeat_last=True)
    memory = SummaryMemory(max_tokens=250, llm=summaries)
    agent = Agent(llm, [fetch], memory=memory)
    result = await agent.run("read")
    assert result.output == "done"
    assert len(result.messages) > len(llm.calls[-1].messages)  # the model saw a window
    assert any("pages were fetched" in (m.content or "") for m in llm.calls[-1].messages)
    assert summaries.calls
    assert memory.summary == ""  # each run works on its own copy: runs do not share summaries


async def test_summary_memory_uses_the_agents_llm_by_default_and_meters_it() -> None:
    @tool
    def fetch(page: int) -> str:
        """Fetch a page."""
        return "words " * 40

    def script(request: ChatRequest) -> object:
        first = request.messages[0].content or ""
        if first.startswith("Summarise"):
            return "summary"
        pages = sum(1 for m in request.messages if m.role == "tool")
        return call("fetch", page=pages + 100) if pages < 5 else "done"

    llm = ScriptedLLM([script], repeat_last=True)
    result = await Agent(llm, [fetch], memory=SummaryMemory(max_tokens=200)).run("read")
    summary_calls = [c for c in llm.calls if (c.messages[0].content or "").startswith("Summarise")]
    assert summary_calls
    step_usage = sum(s.usage.total_tokens for s in result.steps)
    assert result.usage.total_tokens > step_usage
