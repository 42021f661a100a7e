"""What a run returns and what it reports while it runs.

Everything here is pydantic and JSON-serialisable, because hosts write events to a database and
stream them as progress, and store results next to tasks.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from agentkit.approval import PendingApproval
from agentkit.llm.base import Message, ToolCall, Usage
from agentkit.tools import ToolResult


class RunStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    INPUT_REQUIRED = "input_required"
    """Paused before a tool call that needs approval (``RunResult.pending``); not an end."""


class Step(BaseModel):
    """One model call of a run and what came of it.

    ``messages`` are the messages this step added to the transcript (the assistant's reply, the
    tool results, any guidance the planner added), so concatenating them replays the run.
    """

    index: int
    kind: Literal["act", "final", "forced_final", "output_retry"] = "act"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_results: list[ToolResult] = Field(default_factory=list)
    messages: list[Message] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    error: str | None = None


class RunResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    status: RunStatus
    output: str | None = None
    """The final answer text (also set when it was parsed into ``data``)."""
    data: SerializeAsAny[BaseModel] | None = None
    """The final answer validated against ``output_type``, when the agent has one."""
    error: str | None = None
    steps: list[Step] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    messages: list[Message] = Field(default_factory=list)
    """The full transcript, system prompt and goal included."""
    warnings: list[str] = Field(default_factory=list)
    """What a ``completed`` run's answer should be read with, e.g. that every tool call failed."""
    pending: PendingApproval | None = None
    """The call an ``input_required`` run waits on (see ``agentkit.approval``)."""

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.COMPLETED


EventKind = Literal["llm", "tool_call", "tool_result", "progress", "final", "error", "plan"]
"""``progress``: a running tool call reported progress; ``data`` holds ``tool``, ``call_id``,
``progress``, ``total`` and ``message`` (see ``agentkit.progress``)."""


class AgentEvent(BaseModel):
    """A progress report. ``data`` holds only JSON values (it is stored and streamed as is)."""

    kind: EventKind
    step: int
    data: dict[str, Any] = Field(default_factory=dict)
