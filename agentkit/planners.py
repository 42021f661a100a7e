"""How an agent goes from goal to answer: which tools it may call when, and what guidance it gets.

The agent loop (model call, tool execution, limits, cancellation, events) is the same for every
strategy; a ``Planner`` only hooks the decisions that differ, so a new strategy is a small class
and not a new loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from agentkit.errors import AgentConfigError
from agentkit.llm.base import LLM, Message, ToolCall, ToolChoice
from agentkit.result import EventKind, Step
from agentkit.tools import ToolRegistry, ToolResult


@dataclass
class RunContext:
    """The state of one run that planners may read and extend."""

    goal: str
    llm: LLM
    """Metered: usage of calls made through it is added to the run's usage."""
    tools: ToolRegistry
    transcript: list[Message]
    steps: list[Step]
    emit: Callable[[EventKind, dict[str, Any]], Awaitable[None]]
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    """Per-run scratch space, so one planner instance can serve concurrent runs."""
    failure: str | None = None
    """Set by ``fail``: the run ends ``failed`` with this error after the planner hook returns."""

    def fail(self, error: str) -> None:
        """End the run ``failed`` with ``error`` once the current hook (``begin``, ``after_tools``)
        returns: for a planner that sees more steps cannot help (a call that keeps failing)."""
        self.failure = error

    def add(self, message: Message) -> None:
        """Append a message to the transcript and to the current step's record."""
        self.transcript.append(message)
        if self.steps:
            self.steps[-1].messages.append(message)

    @property
    def tools_called(self) -> int:
        return sum(len(s.tool_calls) for s in self.steps)


@runtime_checkable
class Planner(Protocol):
    parallel_tool_calls: bool
    """Run the tool calls of one model turn concurrently."""

    async def begin(self, ctx: RunContext) -> None:
        """Before the first step (for example, write a plan into the transcript)."""
        ...

    def tool_choice(self, ctx: RunContext) -> ToolChoice:
        """What the model may do on the coming step."""
        ...

    async def after_tools(self, ctx: RunContext, step: Step) -> None:
        """After a step's tool calls ran and their results are in the transcript."""
        ...

    async def accept_answer(self, ctx: RunContext, text: str) -> bool:
        """Whether a reply without tool calls ends the run; ``False`` continues (add guidance)."""
        ...


@dataclass(kw_only=True)
class ReActPlanner:
    """Reason and act with native tool calling: the model calls tools until it answers.

    Options that make small models usable, each off by default:

    * ``require_tool_first``: force a tool call on the first step, so the model does not answer
      from thin air when the goal is known to need a tool;
    * ``max_tool_rounds``: after that many steps with tool calls, tools are withdrawn and the
      model must answer from what it has;
    * ``stop_repeated_calls`` (on by default): a step that repeats an earlier call exactly (same
      tool, same arguments) withdraws the tools for the next step, because a model that loops on
      a call it has already seen answered will not stop by itself. If those calls only ever
      failed, the run fails with the last error instead: an answer written without the result
      would hide a broken tool (a frozen server's timeouts) behind a "completed" run.
    """

    require_tool_first: bool = False
    parallel_tool_calls: bool = True
    max_tool_rounds: int | None = None
    stop_repeated_calls: bool = True

    async def begin(self, ctx: RunContext) -> None:
        ctx.state.update(rounds=0, seen=set(), succeeded=set(), answer_now=False)

    def tool_choice(self, ctx: RunContext) -> ToolChoice:
        if not len(ctx.tools):
            return "none"
        if ctx.state.get("answer_now"):
            return "none"
        if self.require_tool_first and ctx.tools_called == 0:
            return ctx.tools.names()[0] if len(ctx.tools) == 1 else "required"
        return "auto"

    async def after_tools(self, ctx: RunContext, step: Step) -> None:
        ctx.state["rounds"] = ctx.state.get("rounds", 0) + 1
        seen: set[str] = ctx.state.setdefault("seen", set())
        succeeded: set[str] = ctx.state.setdefault("succeeded", set())
        keys = {_call_key(c.name, c.arguments) for c in step.tool_calls}
        repeated = self.stop_repeated_calls and bool(keys) and keys <= seen
        seen.update(keys)
        succeeded.update(_call_key(c.name, c.arguments) for c, r in _paired(step) if not r.is_error)
        if repeated and step.tool_results and not keys & succeeded:
            last = step.tool_results[-1]
            count = sum(1 for s in ctx.steps for c in s.tool_calls if _call_key(c.name, c.arguments) in keys)
            ctx.fail(
                f"The same call to {last.name} kept failing ({count} identical calls, none succeeded); "
                f"the last said: {last.content[:500]}. Check that tool's server and arguments, then retry."
            )
        elif repeated:
            ctx.state["answer_now"] = True
            ctx.add(
                Message.user("You already have that result. Answer the goal now, without calling a tool.")
            )
        elif self.max_tool_rounds is not None and ctx.state["rounds"] >= self.max_tool_rounds:
            # No extra instruction: withdrawing the tools says it, and small models answer the
            # goal better when the last thing they read is the tool result.
            ctx.state["answer_now"] = True

    async def accept_answer(self, ctx: RunContext, text: str) -> bool:
        return True


def _call_key(name: str, arguments: dict[str, Any]) -> str:
    return f"{name}:{json.dumps(arguments, sort_keys=True)}"


def _paired(step: Step) -> list[tuple[ToolCall, ToolResult]]:
    """A step's calls with their results, matched by call id (results may be fewer: refused)."""
    by_id = {r.call_id: r for r in step.tool_results}
    return [(c, by_id[c.id]) for c in step.tool_calls if c.id in by_id]


PLAN_PROMPT = (
    "You plan how to reach a goal with tools. Tools available:\n{tools}\n\n"
    "Write a numbered plan of at most {max_steps} short steps, one per line, like '1. ...'. "
    "The last step gives the final answer. Reply with the list only."
)
REVISE_PROMPT = (
    "You plan how to reach a goal with tools. Tools available:\n{tools}\n\n"
    "Goal: {goal}\nSteps done so far:\n{done}\nThe step '{failed}' failed with: {error}\n\n"
    "Write a new numbered plan, at most {max_steps} steps, for the remaining work, avoiding the "
    "failure. Reply with the list only."
)
_NUMBERED = re.compile(r"^\s*(?:step\s*)?(\d+)\s*[.):-]\s*(.+?)\s*$", re.IGNORECASE)


def parse_plan(text: str | None) -> list[str]:
    """Steps of a numbered list; non-numbered non-empty lines count only if nothing was numbered."""
    lines = (text or "").splitlines()
    numbered = [m.group(2) for line in lines if (m := _NUMBERED.match(line))]
    if numbered:
        return numbered
    return [line.strip(" -*") for line in lines if line.strip(" -*")]


@dataclass(kw_only=True)
class PlanAndExecutePlanner:
    """First ask for a numbered plan, then execute it one step at a time, revising when a step fails.

    Good for goals with several dependent parts, where ReAct models tend to stop early. The plan is
    written to the transcript (and reported as a ``plan`` event), each step is handed to the model
    as an instruction, and a failed tool call triggers a revised plan (at most ``max_revisions``).
    """

    max_plan_steps: int = 6
    max_revisions: int = 2
    parallel_tool_calls: bool = True

    @staticmethod
    def _tool_list(ctx: RunContext) -> str:
        return "\n".join(f"- {t.name}: {t.description}" for t in ctx.tools) or "(none)"

    async def _ask(self, ctx: RunContext, system: str, user: str) -> list[str]:
        response = await ctx.llm.chat([Message.system(system), Message.user(user)], tool_choice="none")
        return parse_plan(response.content)[: self.max_plan_steps] or [ctx.goal]

    async def begin(self, ctx: RunContext) -> None:
        plan = await self._ask(
            ctx, PLAN_PROMPT.format(tools=self._tool_list(ctx), max_steps=self.max_plan_steps), ctx.goal
        )
        ctx.state.update(plan=plan, current=0, revisions=0, done=[])
        await ctx.emit("plan", {"plan": plan, "revision": 0})
        ctx.add(Message.assistant("Plan:\n" + _numbered(plan)))
        ctx.add(Message.user(f"Carry out step 1: {plan[0]}"))

    def tool_choice(self, ctx: RunContext) -> ToolChoice:
        return "auto"

    def _advance(self, ctx: RunContext, outcome: str) -> bool:
        """Mark the current step done; return whether steps remain (and instruct the next one)."""
        plan: list[str] = ctx.state["plan"]
        current: int = ctx.state["current"]
        ctx.state["done"].append(f"{plan[current]} -> {outcome}")
        ctx.state["current"] = current + 1
        if current + 1 < len(plan):
            ctx.add(
                Message.user(
                    f"Step {current + 1} is done. Now carry out step {current + 2}: {plan[current + 1]}"
                )
            )
            return True
        return False

    async def after_tools(self, ctx: RunContext, step: Step) -> None:
        plan: list[str] = ctx.state["plan"]
        current: int = ctx.state["current"]
        failures = [r for r in step.tool_results if r.is_error]
        if failures and ctx.state["revisions"] < self.max_revisions:
            ctx.state["revisions"] += 1
            error = "; ".join(r.content for r in failures)
            done = "\n".join(ctx.state["done"]) or "(none)"
            new_plan = await self._ask(
                ctx,
                REVISE_PROMPT.format(
                    tools=self._tool_list(ctx),
                    goal=ctx.goal,
                    done=done,
                    failed=plan[current],
                    error=error,
                    max_steps=self.max_plan_steps,
                ),
                ctx.goal,
            )
            ctx.state["plan"] = new_plan
            ctx.state["current"] = 0
            await ctx.emit("plan", {"plan": new_plan, "revision": ctx.state["revisions"], "error": error})
            ctx.add(
                Message.user(
                    f"That failed. Revised plan:\n{_numbered(new_plan)}\nCarry out step 1: {new_plan[0]}"
                )
            )
            return
        outcome = json.dumps([r.content for r in step.tool_results])[:500]
        if not self._advance(ctx, outcome):
            ctx.add(Message.user("All steps of the plan are done. Give the final answer to the goal now."))

    async def accept_answer(self, ctx: RunContext, text: str) -> bool:
        return not self._advance(ctx, text[:500])


def _numbered(plan: Sequence[str]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(plan, 1))


PLANNERS: dict[str, Callable[[], Planner]] = {
    "react": ReActPlanner,
    "plan_and_execute": PlanAndExecutePlanner,
    "plan-and-execute": PlanAndExecutePlanner,
}


def get_planner(name: str | Planner) -> Planner:
    """A planner by name (``"react"``, ``"plan_and_execute"``), or the given planner unchanged."""
    if not isinstance(name, str):
        return name
    factory = PLANNERS.get(name.lower())
    if factory is None:
        raise AgentConfigError(
            f"Unknown planner {name!r}; choose one of {', '.join(sorted(PLANNERS))} or pass a Planner."
        )
    return factory()
