"""The task models every door shares, and the one place that says which state changes are legal.

``TaskStatus.can_become`` is the whole state machine: the stores call it inside their
compare-and-set, so no other module decides whether, say, a cancelled task may complete.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from agentkit.llm.base import Usage as Usage  # one Usage for agentkit and every door

NO_NUL: dict[str, Any] = {"pattern": "^[^\\u0000]*$"}
"""The JSON Schema of ``refuse_nul``, so the OpenAPI document says what the validator enforces."""
GOAL_MAX_CHARS = 20_000
SYSTEM_PROMPT_MAX_CHARS = 20_000
MAX_STEPS_LIMIT = 100
TIMEOUT_LIMIT_S = 24 * 3600.0
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
"""An opspawn instance's name in a delegation chain (``opspawn.chaining.instance_id``)."""
CHAIN_MAX_LENGTH = 64


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
    INPUT_REQUIRED = "input_required"
    """Paused until a person answers an approval request; holds no worker slot and no lease."""

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    def can_become(self, new: TaskStatus) -> bool:
        return new in _LEGAL[self]


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

# RUNNING -> QUEUED is the recovery path: a worker died, its lease expired, the task runs again.
# RUNNING -> INPUT_REQUIRED pauses for a person; INPUT_REQUIRED -> QUEUED is the answer (or its
# timeout): the task is enqueued again and any worker resumes it from its journal.
_LEGAL: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.CANCELLED,
            TaskStatus.QUEUED,
            TaskStatus.INPUT_REQUIRED,
        }
    ),
    TaskStatus.INPUT_REQUIRED: frozenset({TaskStatus.QUEUED, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PROFILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ModelSettings(_Strict):
    """Which configured model profile runs the agent, and the harmless knobs a client may turn.

    Endpoints, model names and keys live only in the config (``opspawn.llm``, ``opspawn.models``):
    no request can point a worker at a URL or name an environment variable.
    """

    profile: str | None = Field(
        default=None,
        pattern=PROFILE_PATTERN,
        description="A model profile of this server's config; omit for the default one.",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=200_000, description="Per LLM response.")


class Budget(_Strict):
    """Per-task budgets the worker enforces; the caller's limits cap them at submit time."""

    max_llm_tokens: int | None = Field(default=None, ge=1, description="LLM tokens the task may use in all.")
    max_tool_calls: int | None = Field(default=None, ge=1, description="Tool calls the task may make.")


class TaskSpec(_Strict):
    """What a client asks for. Validated here once; every door passes it through unchanged."""

    goal: str = Field(
        min_length=1,
        max_length=GOAL_MAX_CHARS,
        description="What the agent must do.",
        json_schema_extra=NO_NUL,
    )
    system_prompt: str | None = Field(
        default=None, max_length=SYSTEM_PROMPT_MAX_CHARS, json_schema_extra=NO_NUL
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    servers: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Downstream MCP servers the agent may use; omitted means every configured one.",
    )
    planner: Literal["react", "plan_and_execute"] = "react"
    max_steps: int = Field(default=10, ge=1, le=MAX_STEPS_LIMIT)
    timeout_s: float = Field(default=300.0, gt=0, le=TIMEOUT_LIMIT_S)
    budget: Budget = Field(default_factory=Budget)
    chain: list[Annotated[str, Field(pattern=INSTANCE_ID_PATTERN)]] = Field(
        default_factory=list,
        max_length=CHAIN_MAX_LENGTH,
        description="The opspawn instances this goal was delegated through, oldest first (an MCP "
        "caller sends it in _meta io.opspawn/chain); empty for a goal a person submitted.",
    )

    @field_validator("goal", "system_prompt", "servers", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        return refuse_nul(value)


def refuse_nul(value: Any) -> Any:
    """NUL cannot be stored (PostgreSQL text refuses it) and is never meant: a 422, not a 503."""
    texts = value if isinstance(value, list) else [value]
    if any(isinstance(t, str) and "\x00" in t for t in texts):
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


APPROVAL_NOTE_MAX_CHARS = 2_000


class ApprovalRequest(BaseModel):
    """What a paused task asks a person: may the agent make this tool call?

    ``id`` names this request: an answer must name it, so an answer meant for an earlier
    request of the same task can never approve a later one.
    """

    id: str = Field(description="Name this id in the answer (approve_task request_id).")
    server: str = Field(description="The downstream MCP server the call goes to.")
    tool: str = Field(description="The downstream tool the agent wants to call.")
    arguments: dict[str, Any] = Field(default_factory=dict)
    message: str = Field(description="For the person: which call, with which arguments, and why it is asked.")
    requested_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = Field(
        default=None, description="When an unanswered request counts as denied."
    )
    # Which tool call of the run (agentkit's ordinal) at which step: the answer's journal key.
    # Internal, never in an answer at any door (the stores keep them, approval_document).
    tool_call: int = Field(default=0, ge=0, exclude=True)
    step: int = Field(default=0, ge=0, exclude=True)


class ApprovalAnswer(_Strict):
    """A person's answer to an ``ApprovalRequest``."""

    approve: bool = Field(
        strict=True, description="True runs the tool call; false tells the agent it was denied."
    )
    note: str | None = Field(
        default=None,
        max_length=APPROVAL_NOTE_MAX_CHARS,
        description="Why; the agent reads it with a denial.",
        json_schema_extra=NO_NUL,
    )

    @field_validator("note", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        return refuse_nul(value)


class ApprovalInput(ApprovalAnswer):
    """An answer together with the request it answers: the REST body of ``/v1/tasks/{id}/input``."""

    request_id: str = Field(min_length=1, description="The task's approval.id.")


class Task(BaseModel):
    """A task as the store keeps it and every door shows it. Its id is ``task_id`` in every
    answer (REST, the MCP resource, like the MCP tools' ``task_id``); code says ``task.id``."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    id: str = Field(
        default_factory=new_task_id,
        serialization_alias="task_id",
        validation_alias=AliasChoices("task_id", "id"),
    )
    principal: str = Field(default="local", description="Who submitted it: a token's name, or 'local'.")
    spec: TaskSpec
    status: TaskStatus = TaskStatus.QUEUED
    result: str | None = None
    error: str | None = None
    warning: str | None = Field(
        default=None,
        description="Why a completed task's result needs checking: the agent got no successful tool "
        "result (the last tool error is quoted), had no tools, or gave an empty answer.",
    )
    usage: Usage = Field(default_factory=Usage)
    steps: int = 0
    attempts: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    approval: ApprovalRequest | None = Field(
        default=None, description="While input_required: the request waiting for an answer."
    )
    # The worker's lease (host:pid/claim and expiry): internal, never in an answer at any door.
    lease_owner: str | None = Field(default=None, exclude=True)
    lease_expires_at: datetime | None = Field(default=None, exclude=True)
    # When the broker confirmed the task's message (the outbox); internal too.
    enqueued_at: datetime | None = Field(default=None, exclude=True)
    # The submitter's idempotency key (an MCP caller's _meta io.opspawn/idempotency-key, REST's
    # Idempotency-Key): a repeated submit with it answers this task. Unique per principal; internal.
    idempotency_key: str | None = Field(default=None, exclude=True)


EventKind = Literal[
    "state",
    "llm",
    "tool_call",
    "tool_result",
    "progress",
    "log",
    "final",
    "error",
    "input_required",
    "input_answered",
]


class TaskEvent(BaseModel):
    task_id: str
    seq: int
    time: datetime
    kind: EventKind
    data: dict[str, Any] = Field(default_factory=dict)


class TaskPage(BaseModel):
    items: list[Task]
    next_cursor: str | None = None


ExposedKind = Literal["tool", "resource", "prompt"]
AUDIT_ARGUMENTS_MAX_CHARS = 4000
"""Arguments longer than this (as JSON) are kept cut, as ``{"truncated": "<the first chars>"}``."""


class ExposedCall(BaseModel):
    """One request an MCP client made through opspawn's exposed view (``mcpServers.X.expose``),
    as the store keeps it for the audit: who, what, with which arguments, how it ended.

    ``arguments`` have the values of the server's ``${VAR}`` secrets replaced by ``***``, as
    every message about a server has; a resource read keeps ``{}`` (its URI is the ``name``)."""

    id: str = Field(default_factory=new_task_id)
    at: datetime = Field(default_factory=utcnow, description="When the request arrived (UTC).")
    principal: str = Field(description="The principal that made it.")
    server: str
    kind: ExposedKind
    name: str = Field(description="The tool or prompt name on the server, or the resource's downstream URI.")
    arguments: dict[str, Any] = Field(default_factory=dict)
    outcome: Literal["ok", "error"]
    error: str | None = Field(default=None, description="Why it failed; None when it succeeded.")
    duration_ms: float = Field(ge=0, description="From the request to its answer, in milliseconds.")


class ExposedCallPage(BaseModel):
    calls: list[ExposedCall]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next (older) page; null at the end."
    )
