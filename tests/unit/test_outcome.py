"""``Task.warning``'s rule: a completed answer that rests on no successful tool result, or says
nothing, is flagged; one that used a tool successfully is not."""

from __future__ import annotations

import agentkit
from opspawn_mcp.outcome import completion_warning


def run(output: str | None, *results: tuple[str, str, bool]) -> agentkit.RunResult:
    outcomes = [agentkit.ToolResult(name=n, content=c, is_error=e) for n, c, e in results]
    return agentkit.RunResult(
        status=agentkit.RunStatus.COMPLETED,
        output=output,
        steps=[agentkit.Step(index=1, tool_results=outcomes)],
    )


def test_one_successful_tool_result_needs_no_warning() -> None:
    outcome = run("hello", ("t__echo", "oops", True), ("t__echo", "hello", False))
    assert completion_warning(outcome, ["t"]) is None


def test_every_call_failed_quotes_the_last_tool_error_on_one_line() -> None:
    outcome = run("done", ("t__add", "first", True), ("t__fail", "The tool t/fail said:\n  disk full", True))
    assert completion_warning(outcome, ["t"]) == (
        "the agent finished without a successful tool result (last tool error: t__fail: "
        "The tool t/fail said: disk full)"
    )
    long = completion_warning(run("done", ("t__fail", "x" * 1000, True)), ["t"])
    assert long is not None and long.endswith("x...)") and len(long) < 400


def test_no_call_and_no_tools_say_the_answer_is_the_models_alone() -> None:
    assert completion_warning(run("Paris"), ["t"]) == (
        "the agent finished without calling a tool, so the answer comes from the model alone"
    )
    assert completion_warning(run("Paris"), []) == (
        "the agent had no tools (no downstream MCP server is configured or allowed), so the answer "
        "comes from the model alone"
    )


def test_an_empty_answer_is_flagged_even_after_a_good_tool_result() -> None:
    assert completion_warning(run("  ", ("t__echo", "hi", False)), ["t"]) == "the agent gave an empty answer"
    assert completion_warning(run(None), ["t"]) == (
        "the agent gave an empty answer; the agent finished without calling a tool, so the answer "
        "comes from the model alone"
    )
