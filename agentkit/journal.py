"""The step journal: what a run has already done, so a restarted run does not do it again.

A run is a fold over its journal; an interrupted call is re-run only if the tool is idempotent.
See docs/agentkit.md, "Journal: checkpoint and resume".
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from agentkit.approval import Approval
from agentkit.errors import AgentKitError
from agentkit.llm.base import LLMResponse, ToolCall
from agentkit.tools import Tool, ToolResult

IDEMPOTENCY_META_KEY = "io.opspawn/idempotency-key"
"""The ``_meta`` entry of a downstream MCP ``tools/call`` that carries the call's key."""

INTERRUPTED_MESSAGE = (
    "This call was interrupted (the run was restarted while it was in flight); its effect is "
    "unknown. Check before repeating it."
)
"""The error observation of an interrupted call that is not re-run."""

EntryKind = Literal["llm", "tool_started", "tool_finished", "approval"]


class JournalEntry(BaseModel):
    """One fact of a run.

    ``ordinal`` counts per family and is 1-based: the nth model call of the run for ``"llm"``
    (planner and memory calls included), the nth tool call for ``"tool_started"``,
    ``"tool_finished"`` and ``"approval"`` (a person's answer to that call, written by the host). ``step`` is the agent step the fact belongs to (0 before the first step,
    e.g. a plan). ``data`` is JSON: the whole ``LLMResponse`` for ``"llm"``, the ``ToolCall`` for
    ``"tool_started"``, the whole ``ToolResult`` for ``"tool_finished"`` and the ``Approval`` for
    ``"approval"``. ``(kind, ordinal)`` is
    unique within a run; a store can key rows by it.
    """

    kind: EntryKind
    ordinal: int = Field(ge=1)
    step: int = Field(ge=0)
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """``"llm:3"`` or ``"tool:5"`` (a tool call's started and finished entries share it)."""
        return f"{'llm' if self.kind == 'llm' else 'tool'}:{self.ordinal}"

    @classmethod
    def of(cls, kind: EntryKind, ordinal: int, step: int, fact: BaseModel) -> JournalEntry:
        """The entry that records ``fact``, the model ``data`` holds for ``kind`` (see above)."""
        return cls(kind=kind, ordinal=ordinal, step=step, data=fact.model_dump(mode="json"))

    @classmethod
    def approval(cls, ordinal: int, step: int, answer: Approval) -> JournalEntry:
        """A person's answer to the run's ``ordinal``th tool call (``RunResult.pending``)."""
        return cls.of("approval", ordinal, step, answer)

    def response(self) -> LLMResponse:
        """The recorded model response of an ``"llm"`` entry."""
        return LLMResponse.model_validate(self.data)

    def call(self) -> ToolCall:
        """The recorded call of a ``"tool_started"`` entry."""
        return ToolCall.model_validate(self.data)

    def result(self) -> ToolResult:
        """The recorded outcome of a ``"tool_finished"`` entry."""
        return ToolResult.model_validate(self.data)

    def answer(self) -> Approval:
        """The recorded answer of an ``"approval"`` entry."""
        return Approval.model_validate(self.data)


@runtime_checkable
class Journal(Protocol):
    """Where a run's facts are kept. ``load`` is called once when the run starts; ``append`` once
    per fresh fact, awaited before the agent emits the fact's event or acts on it.

    ``append`` may hold the entry and write it together with the event that follows it (see the
    order contract in docs/agentkit.md). An exception from either method stops the run with
    ``JournalError``: a run that cannot record what it does must not go on doing it.
    """

    async def load(self) -> Sequence[JournalEntry]: ...

    async def append(self, entry: JournalEntry) -> None: ...


class MemoryJournal:
    """A journal in a list (``entries``): for tests, and for checkpoints a host serialises itself."""

    def __init__(self, entries: Iterable[JournalEntry] = ()) -> None:
        self.entries: list[JournalEntry] = list(entries)

    async def load(self) -> Sequence[JournalEntry]:
        return list(self.entries)

    async def append(self, entry: JournalEntry) -> None:
        self.entries.append(entry)


class JournalError(AgentKitError):
    """The journal could not be read or written; ``Agent.run`` raises it instead of going on.

    It is the one failure ``run`` does not turn into a ``RunResult``: the journal belongs to the
    host (its store may be down), and a run whose facts are not recorded would be repeated on
    resume. Leave the task to be resumed once the store is back.
    """


CallPolicy = Callable[[ToolCall, Tool | None], "bool | Awaitable[bool]"]
"""A yes/no question about one tool call, as a plain or an async function."""

RerunPolicy = CallPolicy
"""Decides whether a call started but not finished by an earlier run is run again."""

ApprovalPolicy = CallPolicy
"""Decides whether a call needs a person's approval before it runs (``agentkit.approval``)."""


async def rerun_if_idempotent(call: ToolCall, tool: Tool | None) -> bool:
    """The default policy: re-run only a tool known to be idempotent for this call.

    ``Tool.idempotent_for`` answers per call, so ``mcp_proxy_tool`` can look up the annotations
    of the downstream tool the call targets; an unknown tool or unknown idempotency is not re-run.
    """
    if tool is None:
        return False
    return await tool.idempotent_for(call) is True


async def decide(policy: CallPolicy, call: ToolCall, tool: Tool | None) -> bool:
    """Apply a policy that may be a plain function or a coroutine function."""
    decision = policy(call, tool)
    if inspect.isawaitable(decision):
        decision = await decision
    return bool(decision)


_current_call_key: ContextVar[str | None] = ContextVar("agentkit_call_key", default=None)


def current_call_key() -> str | None:
    """The key of the tool call running in this context: ``"{run_id}:{step}:{ordinal}"``.

    Without a ``run_id`` the run uses a fresh uuid in its place. The same run id gives the same key
    to the same call after a restart, which is what lets a downstream server de-duplicate.
    """
    return _current_call_key.get()


def set_current_call_key(key: str | None) -> Any:
    """Install ``key`` for the current context; returns the token for ``reset_current_call_key``."""
    return _current_call_key.set(key)


def reset_current_call_key(token: Any) -> None:
    _current_call_key.reset(token)
