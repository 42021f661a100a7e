"""Why a completed task's answer needs checking: the one rule behind ``Task.warning``.

See docs/workers.md, "What the actor does" (step 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import agentkit

QUOTE_CHARS = 300
"""How much of the last tool error a warning quotes: enough to see why, short enough for a table."""


def completion_warning(result: agentkit.RunResult, servers: Sequence[str]) -> str | None:
    """The warning for a completed ``result`` of an agent allowed ``servers``; None when its answer
    rests on at least one successful tool result and is not empty."""
    problems: list[str] = []
    if not (result.output or "").strip():
        problems.append("the agent gave an empty answer")
    outcomes = [r for step in result.steps for r in step.tool_results]
    if not any(not r.is_error for r in outcomes):
        problems.append(_no_tool_result(outcomes, servers))
    return "; ".join(problems) or None


def _no_tool_result(outcomes: Sequence[agentkit.ToolResult], servers: Sequence[str]) -> str:
    if not servers:
        return (
            "the agent had no tools (no downstream MCP server is configured or allowed), so the "
            "answer comes from the model alone"
        )
    if not outcomes:
        return "the agent finished without calling a tool, so the answer comes from the model alone"
    last = outcomes[-1]
    text = " ".join(last.content.split())
    quoted = text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."
    return f"the agent finished without a successful tool result (last tool error: {last.name}: {quoted})"
