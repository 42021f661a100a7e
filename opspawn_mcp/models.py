"""The task models every door shares, and the one place that says which state changes are legal.

``TaskStatus.can_become`` is the whole state machine: the stores call it inside their
compare-and-set, so no other module decides whether, say, a cancelled task may complete.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GOAL_MAX_CHARS = 20_000
SYSTEM_PROMPT_MAX_CHARS = 20_000
MAX_STEPS_LIMIT = 100
TIMEOUT_LIMIT_S = 24 * 3600.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_task_id() -> str:
    return uuid.uuid4().hex


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    def can_become(self, new: TaskStatus) -> bool:
        return new in _LEGAL[self]


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

# RUNNING -> QUEUED is the recovery path: a worker died, its lease expired, the task runs again.
_LEGAL: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.QUEUED}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """Which LLM runs the agent. Unset fields fall back to the config's ``opspawn.llm`` defaults.

    ``api_key_env`` names an environment variable of the worker; the key itself never travels
    with a task, so it never reaches the store, the logs or an answer.
    """

    provider: Literal["openai", "local"] | None = Field(
        default=None,
        description="'openai' for any OpenAI-compatible endpoint, 'local' for the bundled GGUF model.",
    )
    base_url: str | None = Field(default=None, max_length=2048)
    model: str | None = Field(default=None, max_length=256)
    api_key_env: str | None = Field(default=None, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=200_000)


class TaskSpec(_Strict):
    """What a client asks for. Validated here once; every door passes it through unchanged."""

    goal: str = Field(min_length=1, max_length=GOAL_MAX_CHARS, description="What the agent must do.")
    system_prompt: str | None = Field(default=None, max_length=SYSTEM_PROMPT_MAX_CHARS)
    model: ModelSettings = Field(default_factory=ModelSettings)
    servers: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Downstream MCP servers the agent may use; omitted means every configured one.",
    )
    planner: Literal["react", "plan_and_execute"] = "react"
    max_steps: int = Field(default=10, ge=1, le=MAX_STEPS_LIMIT)
    timeout_s: float = Field(default=300.0, gt=0, le=TIMEOUT_LIMIT_S)


class Usage(_Strict):
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Task(BaseModel):
    id: str = Field(default_factory=new_task_id)
    spec: TaskSpec
    status: TaskStatus = TaskStatus.QUEUED
    result: str | None = None
    error: str | None = None
    usage: Usage = Field(default_factory=Usage)
    steps: int = 0
    attempts: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None


EventKind = Literal["state", "llm", "tool_call", "tool_result", "progress", "log", "final", "error"]


class TaskEvent(BaseModel):
    task_id: str
    seq: int
    time: datetime
    kind: EventKind
    data: dict[str, Any] = Field(default_factory=dict)


class TaskPage(BaseModel):
    items: list[Task]
    next_cursor: str | None = None
