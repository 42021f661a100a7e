"""The agent loop: ask the model, run the tools it calls, feed back what they returned, repeat.

Every run ends with a ``RunResult`` whose status says how; tool and model failures are data.
See docs/agentkit.md, "A complete example" and "The loop".
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from pydantic import BaseModel, ValidationError

from agentkit.approval import Approval, PendingApproval, denial_message
from agentkit.errors import AgentConfigError, validation_problems
from agentkit.journal import (
    INTERRUPTED_MESSAGE,
    ApprovalPolicy,
    EntryKind,
    Journal,
    JournalEntry,
    JournalError,
    RerunPolicy,
    decide,
    rerun_if_idempotent,
    reset_current_call_key,
    set_current_call_key,
)
from agentkit.llm.base import (
    LLM,
    ChatRequest,
    LLMError,
    LLMResponse,
    LLMWrapper,
    Message,
    ToolCall,
    ToolChoice,
    Usage,
)
from agentkit.memory import Memory
from agentkit.planners import Planner, RunContext, get_planner
from agentkit.progress import ToolProgress, reset_current_progress, set_current_progress
from agentkit.result import AgentEvent, EventKind, RunResult, RunStatus, Step
from agentkit.tools import Tool, ToolRegistry, ToolResult

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are an agent that reaches the user's goal step by step. Call a tool whenever it can give "
    "you information or do work you cannot do yourself; read each tool result before the next "
    "step. When you know the answer, reply with it directly, without calling a tool."
)
FORCED_FINAL_PROMPT = (
    "You have used all {max_steps} steps. Do not call any tool. Give your best final answer to the "
    "goal now, using only what you found so far."
)
ALL_TOOLS_FAILED_WARNING = "every tool call failed; the answer was written without any tool result"
EMPTY_REPLY_PROMPT = "Your reply was empty. Call a tool, or give the final answer."
OUTPUT_PROMPT = (
    "Your final answer must be only a JSON object (no prose, no code fence) that matches this JSON "
    "schema:\n{schema}"
)
OUTPUT_RETRY_PROMPT = (
    "Your final answer did not match the required schema: {error}\n"
    "Reply again with only a JSON object that matches:\n{schema}"
)

EventCallback = Callable[[AgentEvent], Awaitable[None]]


class _OverBudget(Exception):
    """A run used more LLM tokens than ``max_total_tokens``; ``run`` turns it into ``failed``.

    It carries the response that crossed the budget, so its step still records what the model
    said and what it cost.
    """

    def __init__(self, message: str, response: LLMResponse, replayed: bool = False) -> None:
        super().__init__(message)
        self.response = response
        self.replayed = replayed


class _Paused(Exception):
    """A call needs approval and the journal holds no answer: ``run`` ends ``input_required``."""

    def __init__(self, pending: PendingApproval) -> None:
        super().__init__(f"tool call {pending.ordinal} ({pending.call.name}) needs approval")
        self.pending = pending


class _RunJournal:
    """One run's view of its journal: the facts it replays and the ordinals of the next ones.

    It also exists without a journal, because the ordinals make the call keys. Replaying is by
    ordinal: the nth model call (or tool call) of a resumed run is the nth of the run that wrote
    the journal, since everything between facts is computed the same way from the same facts.
    """

    def __init__(self, journal: Journal | None, run_id: str | None) -> None:
        self.journal = journal
        self.run_key = run_id if run_id is not None else uuid.uuid4().hex
        self._entries: dict[tuple[EntryKind, int], JournalEntry] = {}
        self._unconsumed: set[tuple[EntryKind, int]] = set()
        self.llm_calls = 0
        self.tool_calls = 0

    async def load(self) -> None:
        if self.journal is None:
            return
        try:
            entries = await self.journal.load()
        except Exception as exc:
            raise JournalError(f"Loading the run's journal failed: {type(exc).__name__}: {exc}") from exc
        for entry in entries:
            self._entries.setdefault((entry.kind, entry.ordinal), entry)
        self._unconsumed = set(self._entries)

    @property
    def replaying(self) -> bool:
        """Whether recorded facts remain ahead: the run has not yet passed where the last run got."""
        return bool(self._unconsumed)

    def has(self, kind: EntryKind, ordinal: int) -> bool:
        return (kind, ordinal) in self._entries

    def take(self, kind: EntryKind, ordinal: int) -> JournalEntry | None:
        entry = self._entries.get((kind, ordinal))
        if entry is not None:
            self._unconsumed.discard((kind, ordinal))
        return entry

    async def append(self, entry: JournalEntry) -> None:
        if self.journal is None:
            return
        try:
            await self.journal.append(entry)
        except Exception as exc:
            raise JournalError(
                f"Appending {entry.key} ({entry.kind}) to the run's journal failed: {type(exc).__name__}: {exc}"
            ) from exc

    def call_key(self, step: int, ordinal: int) -> str:
        return f"{self.run_key}:{step}:{ordinal}"


def _recorded(entry: JournalEntry, read: Callable[[], Any]) -> Any:
    """An entry's payload as its model; a malformed entry is the journal's fault, not the run's."""
    try:
        return read()
    except ValidationError as exc:
        raise JournalError(f"The journal entry {entry.key} ({entry.kind}) is not valid: {exc}") from exc


class _MeteredLLM(LLMWrapper):
    """Sums usage over every call a run makes, including those of planners and memory.

    Every call goes through here, so this is where ``max_total_tokens`` is enforced (after each
    response, before the run acts on it) and where model calls are journaled and replayed: a
    recorded response is returned without asking the model, and its usage still counts.
    """

    def __init__(
        self,
        llm: LLM,
        max_total_tokens: int | None = None,
        journal: _RunJournal | None = None,
        step: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__(llm)
        self.usage = Usage()
        self.max_total_tokens = max_total_tokens
        self.journal = journal if journal is not None else _RunJournal(None, None)
        self.step = step

    async def complete(self, request: ChatRequest) -> LLMResponse:
        response, _ = await self.complete_traced(request)
        return response

    async def complete_traced(self, request: ChatRequest) -> tuple[LLMResponse, bool]:
        """The response and whether it was replayed from the journal (its event was emitted then)."""
        self.journal.llm_calls += 1
        ordinal = self.journal.llm_calls
        entry = self.journal.take("llm", ordinal)
        if entry is not None:
            response: LLMResponse = _recorded(entry, entry.response)
        else:
            response = await self.inner.complete(request)
            await self.journal.append(JournalEntry.of("llm", ordinal, self.step(), response))
        replayed = entry is not None
        self.usage = self.usage + response.usage
        if self.max_total_tokens is not None and self.usage.total_tokens > self.max_total_tokens:
            raise _OverBudget(
                f"The run used {self.usage.total_tokens} LLM tokens; its budget (max_total_tokens) is "
                f"{self.max_total_tokens}. Raise the budget or simplify the goal.",
                response,
                replayed,
            )
        return response, replayed


@dataclass
class _Run:
    """What one run's loop needs besides the planner's context."""

    metered: _MeteredLLM
    journal: _RunJournal
    memory: Memory | None


class Agent:
    """An LLM with tools, a planner and a memory, run towards one goal at a time.

    ``tools`` may be a ``ToolRegistry`` (shared, so tools added later are seen) or a sequence of
    tools. ``planner`` is a name (``"react"``, ``"plan_and_execute"``) or a ``Planner``. Without a
    ``memory`` the model sees the whole transcript. ``output_type`` makes the final answer a
    validated pydantic model (``RunResult.data``), with one retry that shows the model its errors.
    ``tool_timeout_s`` bounds each tool call (a slow tool becomes an error observation).
    ``max_tool_errors`` ends the run ``failed`` after that many tool calls in a row returned errors:
    one failed call is an observation the model can correct, a streak means the tool (or its
    server) is broken and more steps only burn tokens.
    ``max_tool_calls`` and ``max_total_tokens`` are per-run budgets, so a host can bound what one
    goal may spend: a tool call beyond ``max_tool_calls`` is not run, and the run ends ``failed``
    as soon as the input plus output tokens the model reported exceed ``max_total_tokens``.
    Progress a tool reports while it runs (``agentkit.progress.report_progress``, or a downstream
    MCP server's progress notifications through the MCP tools) becomes ``progress`` events, at
    most one per ``progress_interval_s`` per tool call plus always the last one.
    ``run(goal, journal=...)`` checkpoints every model response and tool outcome and resumes from
    them (``agentkit.journal``); ``rerun_interrupted(call, tool)`` decides whether a call that was
    in flight when an earlier run died runs again (default ``rerun_if_idempotent``: only tools
    known to be idempotent; it may be a plain or an async function).
    ``require_approval(call, tool)`` (same shape) names the calls a person must approve first:
    the run then ends ``input_required`` before running its step's calls, and a run on the
    journal with the answer added goes on (``agentkit.approval``).
    """

    def __init__(
        self,
        llm: LLM,
        tools: ToolRegistry | Sequence[Tool] | None = None,
        *,
        planner: str | Planner = "react",
        memory: Memory | None = None,
        system_prompt: str | None = None,
        max_steps: int = 10,
        timeout_s: float | None = None,
        on_event: EventCallback | None = None,
        output_type: type[BaseModel] | None = None,
        tool_timeout_s: float | None = None,
        progress_interval_s: float = 0.5,
        max_tool_errors: int | None = None,
        max_tool_calls: int | None = None,
        max_total_tokens: int | None = None,
        rerun_interrupted: RerunPolicy | None = None,
        require_approval: ApprovalPolicy | None = None,
    ) -> None:
        if max_steps < 1:
            raise AgentConfigError("max_steps must be at least 1.")
        for name, limit in (
            ("max_tool_errors", max_tool_errors),
            ("max_tool_calls", max_tool_calls),
            ("max_total_tokens", max_total_tokens),
        ):
            if limit is not None and limit < 1:
                raise AgentConfigError(f"{name} must be at least 1, or None for no limit.")
        if timeout_s is not None and timeout_s <= 0:
            raise AgentConfigError("timeout_s must be positive, or None for no limit.")
        self.llm = llm
        self.tools = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools or ())
        self.planner = get_planner(planner)
        self.memory = memory
        self.system_prompt = system_prompt if system_prompt is not None else DEFAULT_SYSTEM_PROMPT
        self.max_steps = max_steps
        self.timeout_s = timeout_s
        self.on_event = on_event
        self.output_type = output_type
        self.tool_timeout_s = tool_timeout_s
        self.progress_interval_s = progress_interval_s
        self.max_tool_errors = max_tool_errors
        self.max_tool_calls = max_tool_calls
        self.max_total_tokens = max_total_tokens
        self.rerun_interrupted: RerunPolicy = (
            rerun_interrupted if rerun_interrupted is not None else rerun_if_idempotent
        )
        self.require_approval = require_approval
        self._scopes: set[anyio.CancelScope] = set()
        self._cancel_pending = False
        self._cancelled_scopes: set[anyio.CancelScope] = set()

    def cancel(self) -> None:
        """Stop the runs in progress promptly (they return ``cancelled``).

        Works during a model call or a tool call, not only between steps. Called when no run is in
        progress, it cancels the next run as soon as it starts (a host's cancel may race the
        start). Call it from the event loop's thread.
        """
        if not self._scopes:
            self._cancel_pending = True
        for scope in list(self._scopes):
            self._cancelled_scopes.add(scope)
            scope.cancel()

    def _system_message(self) -> Message | None:
        parts = [self.system_prompt] if self.system_prompt else []
        if self.output_type is not None:
            parts.append(OUTPUT_PROMPT.format(schema=json.dumps(self.output_type.model_json_schema())))
        return Message.system("\n\n".join(parts)) if parts else None

    async def _emit(self, kind: EventKind, step: int, data: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            await self.on_event(AgentEvent(kind=kind, step=step, data=data))
        except Exception:
            # A broken progress sink must not break the run it reports on.
            log.exception("the on_event callback failed for a %s event", kind)

    async def run(self, goal: str, *, journal: Journal | None = None, run_id: str | None = None) -> RunResult:
        """Run until a final answer, ``max_steps``, ``timeout_s`` or ``cancel()``.

        Never raises for tool or model failures. If the task awaiting ``run`` is itself cancelled
        (not through ``cancel()``), the cancellation propagates as usual for asyncio/anyio.

        With a ``journal`` the run replays the facts it holds (no model or tool call, no event)
        and appends the new ones; a journal that cannot be read or written raises
        ``JournalError``, so the host can resume later instead of recording a failure.
        ``run_id`` names the run in the call keys (``current_call_key()``); give the same one on
        resume so downstream servers see the same key for the same call.
        """
        system = self._system_message()
        transcript = ([system] if system else []) + [Message.user(goal)]
        steps: list[Step] = []
        run_journal = _RunJournal(journal, run_id)
        metered = _MeteredLLM(self.llm, self.max_total_tokens, run_journal, lambda: ctx.step)
        memory = copy.copy(self.memory)  # memories keep per-run state (summaries)
        run = _Run(metered=metered, journal=run_journal, memory=memory)

        async def emit(kind: EventKind, data: dict[str, Any]) -> None:
            if run_journal.replaying and kind in ("plan", "error"):
                return  # derived from replayed facts: the run that recorded them emitted it
            await self._emit(kind, ctx.step, data)

        ctx = RunContext(
            goal=goal, llm=metered, tools=self.tools, transcript=transcript, steps=steps, emit=emit
        )
        deadline = anyio.current_time() + self.timeout_s if self.timeout_s is not None else math.inf
        scope = anyio.CancelScope(deadline=deadline)
        result: RunResult | None = None
        journal_error: JournalError | None = None
        self._scopes.add(scope)
        if self._cancel_pending:
            self._cancel_pending = False
            self._cancelled_scopes.add(scope)
            scope.cancel()
        try:
            with scope:
                try:
                    await run_journal.load()
                    result = await self._loop(ctx, run)
                except JournalError as exc:
                    journal_error = exc
                except _Paused as paused:
                    result = RunResult(status=RunStatus.INPUT_REQUIRED, pending=paused.pending)
                except (LLMError, _OverBudget) as exc:
                    result = RunResult(status=RunStatus.FAILED, error=str(exc))
                except Exception as exc:  # a bug in a planner, memory or callback: still data
                    log.exception("agent run failed unexpectedly")
                    result = RunResult(
                        status=RunStatus.FAILED, error=f"internal error: {type(exc).__name__}: {exc}"
                    )
        finally:
            self._scopes.discard(scope)
            cancelled = scope in self._cancelled_scopes
            self._cancelled_scopes.discard(scope)
        if journal_error is not None:
            raise journal_error  # no final event either: the run is not over, it is to be resumed
        if result is None:
            if cancelled:
                result = RunResult(status=RunStatus.CANCELLED, error="The run was cancelled.")
            else:
                result = RunResult(
                    status=RunStatus.TIMED_OUT,
                    error=f"The run did not finish within timeout_s={self.timeout_s}; raise it or simplify the goal.",
                )
        result.steps = steps
        result.usage = metered.usage
        result.messages = transcript
        if result.status is RunStatus.COMPLETED:
            outcomes = [r for s in steps for r in s.tool_results]
            if outcomes and all(r.is_error for r in outcomes):
                last = outcomes[-1]
                result.warnings.append(
                    f"{ALL_TOOLS_FAILED_WARNING}; the last, {last.name}, said: {last.content[:300]}"
                )
            data = result.data.model_dump(mode="json") if result.data is not None else None
            await self._emit(
                "final",
                ctx.step,
                {
                    "status": result.status.value,
                    "output": result.output,
                    "data": data,
                    "usage": _usage(result.usage),
                    "warnings": list(result.warnings),
                },
            )
        elif result.status is not RunStatus.INPUT_REQUIRED:  # a pause is not an end: no event
            await self._emit(
                "error",
                ctx.step,
                {"status": result.status.value, "error": result.error, "usage": _usage(result.usage)},
            )
        return result

    async def _call_llm(self, ctx: RunContext, run: _Run, step: Step, tool_choice: ToolChoice) -> LLMResponse:
        memory = run.memory
        window = await memory.window(ctx.transcript, ctx.llm) if memory is not None else list(ctx.transcript)
        tools = self.tools.definitions() if tool_choice != "none" else []
        over: _OverBudget | None = None
        try:
            response, replayed = await run.metered.complete_traced(
                ChatRequest(window, tools, tool_choice if tools else "none")
            )
        except _OverBudget as exc:
            over, response, replayed = exc, exc.response, exc.replayed
        step.content = response.content
        step.usage = response.usage
        if not replayed:
            await ctx.emit(
                "llm",
                {
                    "content": response.content,
                    "tool_calls": [c.model_dump(mode="json") for c in response.tool_calls],
                    "usage": _usage(response.usage),
                    "finish_reason": response.finish_reason,
                    "kind": step.kind,
                },
            )
        if over is not None:
            raise over
        return response

    def _new_step(self, ctx: RunContext, kind: Any = "act") -> Step:
        ctx.step = len(ctx.steps) + 1
        step = Step(index=ctx.step, kind=kind)
        ctx.steps.append(step)
        return step

    async def _loop(self, ctx: RunContext, run: _Run) -> RunResult:
        await anyio.lowlevel.checkpoint()
        await self.planner.begin(ctx)
        if ctx.failure is not None:
            return RunResult(status=RunStatus.FAILED, error=ctx.failure)
        error_streak = 0
        tool_calls_run = 0
        for _ in range(self.max_steps):
            # A checkpoint per step, so cancel() and the timeout land between steps even when the
            # model and the tools never yield (scripted or cached responses).
            await anyio.lowlevel.checkpoint()
            step = self._new_step(ctx)
            response = await self._call_llm(ctx, run, step, self.planner.tool_choice(ctx))
            if response.tool_calls:
                step.tool_calls = response.tool_calls
                ctx.add(Message.assistant(response.content, response.tool_calls))
                allowed = response.tool_calls
                if self.max_tool_calls is not None:
                    allowed = allowed[: max(0, self.max_tool_calls - tool_calls_run)]
                tool_calls_run += len(allowed)
                step.tool_results = await self._run_tools(ctx, run, allowed)
                for r in step.tool_results:
                    ctx.add(Message.tool(r.call_id, r.name, r.content))
                    error_streak = error_streak + 1 if r.is_error else 0
                if len(allowed) < len(response.tool_calls):
                    return self._refuse_tool_calls(ctx, step, response.tool_calls[len(allowed) :])
                if self.max_tool_errors is not None and error_streak >= self.max_tool_errors:
                    last = step.tool_results[-1]
                    return RunResult(
                        status=RunStatus.FAILED,
                        error=(
                            f"{error_streak} tool calls failed in a row; the last, {last.name}, said: "
                            f"{last.content[:500]}. Check that tool's server and arguments, then retry."
                        ),
                    )
                await self.planner.after_tools(ctx, step)
                if ctx.failure is not None:
                    return RunResult(status=RunStatus.FAILED, error=ctx.failure)
                continue
            text = (response.content or "").strip()
            if not text:
                ctx.add(Message.assistant(response.content))
                ctx.add(Message.user(EMPTY_REPLY_PROMPT))
                continue
            ctx.add(Message.assistant(text))
            if await self.planner.accept_answer(ctx, text):
                step.kind = "final"
                return await self._finish(ctx, run, text)
        # Out of steps: one last call with tools disabled, so the run still ends with an answer.
        step = self._new_step(ctx, "forced_final")
        ctx.add(Message.user(FORCED_FINAL_PROMPT.format(max_steps=self.max_steps)))
        response = await self._call_llm(ctx, run, step, "none")
        text = (response.content or "").strip()
        ctx.add(Message.assistant(text))
        if not text:
            return RunResult(
                status=RunStatus.FAILED,
                error=f"No final answer after max_steps={self.max_steps}; raise max_steps or simplify the goal.",
            )
        return await self._finish(ctx, run, text)

    def _refuse_tool_calls(self, ctx: RunContext, step: Step, refused: Sequence[ToolCall]) -> RunResult:
        """End the run at the tool-call budget, without running the calls beyond it.

        Each refused call still gets a result in the transcript (an assistant tool call without
        one is an invalid conversation for the next request, a resume or a replay).
        """
        budget = f"its budget of {self.max_tool_calls} tool call{'s' if self.max_tool_calls != 1 else ''}"
        for call in refused:
            result = ToolResult(
                call_id=call.id,
                name=call.name,
                is_error=True,
                content=f"Not run: the run reached {budget} (max_tool_calls).",
            )
            step.tool_results.append(result)
            ctx.add(Message.tool(result.call_id, result.name, result.content))
        return RunResult(
            status=RunStatus.FAILED,
            error=(
                f"The run reached {budget} (max_tool_calls); the model asked for "
                f"{len(refused)} more, which did not run. Raise the budget or simplify the goal."
            ),
        )

    async def _finish(self, ctx: RunContext, run: _Run, text: str) -> RunResult:
        if self.output_type is None:
            return RunResult(status=RunStatus.COMPLETED, output=text)
        schema = json.dumps(self.output_type.model_json_schema())
        try:
            return RunResult(
                status=RunStatus.COMPLETED, output=text, data=_parse_output(self.output_type, text)
            )
        except ValidationError as exc:
            error = "; ".join(validation_problems(exc, root="answer"))
        await ctx.emit("error", {"error": f"final answer did not validate: {error}", "retrying": True})
        step = self._new_step(ctx, "output_retry")
        ctx.add(Message.user(OUTPUT_RETRY_PROMPT.format(error=error, schema=schema)))
        response = await self._call_llm(ctx, run, step, "none")
        retry = (response.content or "").strip()
        ctx.add(Message.assistant(retry))
        try:
            return RunResult(
                status=RunStatus.COMPLETED, output=retry, data=_parse_output(self.output_type, retry)
            )
        except ValidationError as exc:
            step.error = "; ".join(validation_problems(exc, root="answer"))
            return RunResult(
                status=RunStatus.FAILED,
                output=retry,
                error=(
                    f"The final answer did not match {self.output_type.__name__} after one retry: {step.error}. "
                    "Use a stronger model, a simpler output type, or describe the fields in the goal."
                ),
            )

    async def _run_tools(self, ctx: RunContext, run: _Run, calls: Sequence[ToolCall]) -> list[ToolResult]:
        results: list[ToolResult | None] = [None] * len(calls)
        first = run.journal.tool_calls + 1  # ordinals in the model's order, however the calls interleave
        await self._check_approvals(ctx, run, calls, first)
        run.journal.tool_calls += len(calls)

        async def run_one(index: int, call: ToolCall) -> None:
            results[index] = await self._run_tool(ctx, run, call, first + index)

        if self.planner.parallel_tool_calls and len(calls) > 1:
            try:
                async with anyio.create_task_group() as tg:
                    for i, c in enumerate(calls):
                        tg.start_soon(run_one, i, c)
            except ExceptionGroup as group:
                raise _first_leaf(group) from None
        else:
            for i, c in enumerate(calls):
                await run_one(i, c)
        return [r for r in results if r is not None]

    async def _needs_approval(self, call: ToolCall) -> bool:
        if self.require_approval is None:
            return False
        return await decide(self.require_approval, call, self.tools.get(call.name))

    async def _check_approvals(
        self, ctx: RunContext, run: _Run, calls: Sequence[ToolCall], first: int
    ) -> None:
        """Pause before a step's calls if one needs approval and has no answer yet, so no call of
        the step runs (concurrently or not) before every one of them may. A call the journal
        shows started or finished is past its approval."""
        journal = run.journal
        for ordinal, call in enumerate(calls, start=first):
            if any(journal.has(k, ordinal) for k in ("approval", "tool_started", "tool_finished")):
                continue
            if await self._needs_approval(call):
                raise _Paused(PendingApproval(ordinal=ordinal, step=ctx.step, call=call))

    async def _run_tool(self, ctx: RunContext, run: _Run, call: ToolCall, ordinal: int) -> ToolResult:
        """The one place a tool call happens: replayed if journaled, else journaled around its run.

        Fresh: append ``tool_started``, emit ``tool_call``, run, append ``tool_finished``, emit
        ``tool_result``. Finished earlier: the recorded result, no event. Started but not finished
        (the earlier run died during it): re-run if ``rerun_interrupted`` says so, else the
        interrupted observation, journaled so a second restart does not ask again. Denied by a
        person (an ``approval`` entry that says no): the denial observation, journaled the same way.
        """
        journal, step = run.journal, ctx.step
        started = journal.take("tool_started", ordinal)
        finished = journal.take("tool_finished", ordinal)
        answered = journal.take("approval", ordinal)
        if started is not None or finished is not None:
            was: ToolCall | None = _recorded(started, started.call) if started is not None else None
            done: ToolResult | None = _recorded(finished, finished.result) if finished is not None else None
            name = was.name if was is not None else done.name if done is not None else call.name
            if name != call.name or (was is not None and was.arguments != call.arguments):
                raise JournalError(
                    f"The journal does not match this run: tool call {ordinal} was recorded as {name!r}"
                    + (f" with {json.dumps(was.arguments)}" if was is not None else "")
                    + f", this run asks for {call.name!r} with {json.dumps(call.arguments)}. Resume with "
                    "the agent (tools, planner, prompts) and goal that wrote the journal."
                )
            if done is not None:
                return done
        if started is None:
            answer: Approval | None = _recorded(answered, answered.answer) if answered is not None else None
            if answer is not None and not answer.approved:
                denied = ToolResult(
                    call_id=call.id, name=call.name, is_error=True, content=denial_message(answer)
                )
                return await self._record_outcome(ctx, run, ordinal, denied)
            await journal.append(JournalEntry.of("tool_started", ordinal, step, call))
            await ctx.emit("tool_call", {"id": call.id, "name": call.name, "arguments": call.arguments})
        elif not await decide(self.rerun_interrupted, call, self.tools.get(call.name)):
            interrupted = ToolResult(
                call_id=call.id, name=call.name, is_error=True, content=INTERRUPTED_MESSAGE
            )
            return await self._record_outcome(ctx, run, ordinal, interrupted)
        result = await self._call_tool(ctx, call, journal.call_key(step, ordinal))
        return await self._record_outcome(ctx, run, ordinal, result)

    async def _record_outcome(
        self, ctx: RunContext, run: _Run, ordinal: int, result: ToolResult
    ) -> ToolResult:
        await run.journal.append(JournalEntry.of("tool_finished", ordinal, ctx.step, result))
        await ctx.emit("tool_result", result.model_dump(mode="json"))
        return result

    async def _call_tool(self, ctx: RunContext, call: ToolCall, key: str) -> ToolResult:
        """Run one call with its key and progress sink installed for the tools (and MCP callers)."""
        key_token = set_current_call_key(key)
        try:
            if self.on_event is None:
                return await self._invoke_tool(call)
            step = ctx.step

            async def emit(data: dict[str, Any]) -> None:
                await self._emit("progress", step, data)

            progress = ToolProgress(
                emit, tool=call.name, call_id=call.id, interval_s=self.progress_interval_s
            )
            token = set_current_progress(progress)
            try:
                result = await self._invoke_tool(call)
                await progress.finish()  # before the tool_result event, so progress never follows it
            finally:
                progress.close()
                reset_current_progress(token)
            return result
        finally:
            reset_current_call_key(key_token)

    async def _invoke_tool(self, call: ToolCall) -> ToolResult:
        if self.tool_timeout_s is None:
            return await self.tools.call(call)
        with anyio.move_on_after(self.tool_timeout_s):
            return await self.tools.call(call)
        return ToolResult(
            call_id=call.id,
            name=call.name,
            is_error=True,
            content=f"Tool {call.name} did not finish within {self.tool_timeout_s}s; try other arguments or another tool.",
        )


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The exception to raise for a failed group of concurrent tool calls (a journal error first)."""
    journal_errors = group.subgroup(JournalError)
    chosen = journal_errors if journal_errors is not None else group
    first = chosen.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _parse_output(output_type: type[BaseModel], text: str) -> BaseModel:
    """Validate a final answer, tolerating a code fence or prose around the JSON object."""
    candidate = text.strip()
    fenced = _FENCE.match(candidate)
    if fenced:
        candidate = fenced.group(1)
    start, end = candidate.find("{"), candidate.rfind("}")
    if start != -1 and end > start:
        candidate = candidate[start : end + 1]
    return output_type.model_validate_json(candidate)


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }
