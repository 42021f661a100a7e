"""The one interface every model client implements, and the message types it speaks.

Our own small pydantic types in the Chat Completions shape; the wire helpers are ``llm.wire``.
See docs/agentkit.md, "Models".
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, computed_field

from agentkit.errors import AgentKitError

Role = Literal["system", "user", "assistant", "tool"]
ToolChoice = Literal["auto", "required", "none"] | str
"""``"auto"``, ``"required"`` (some tool), ``"none"``, or the name of the one tool to call."""

TokenCounter = Callable[[str], int]


def estimate_tokens(text: str) -> int:
    """Cheap token estimate (about four characters a token) used where exact counts do not matter.

    Budgets only need to be roughly right and a real tokenizer would tie agentkit to one model
    family; pass your own ``TokenCounter`` (for example ``tiktoken``) where they must be exact.
    """
    if not text:
        return 0
    return (len(text) + 3) // 4


class LLMError(AgentKitError):
    """A model call failed after retries; the run that made it ends ``failed`` with this message."""

    def __init__(self, message: str, *, retryable: bool = False, status_code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


class Usage(BaseModel):
    """Token counts, summed over every model call of a run (including summaries and plans).

    One model for agentkit and opspawn's doors: ``total_tokens`` is derived, so it is in every
    serialised answer and never stored apart from its parts; a document that carries it back is
    read without it (unknown keys are ignored)."""

    input_tokens: int = 0
    output_tokens: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


class ToolCall(BaseModel):
    """One call the model asked for.

    ``raw_arguments`` keeps the model's text when it was not a JSON object, so the tool layer can
    tell the model exactly what it sent instead of silently calling with ``{}``.
    """

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    raw_arguments: str | None = None


class Message(BaseModel):
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    """For ``tool`` messages: the tool's name (some templates need it, and it helps summaries)."""

    @classmethod
    def system(cls, content: str) -> Message:
        return cls(role="system", content=content)

    @classmethod
    def user(cls, content: str) -> Message:
        return cls(role="user", content=content)

    @classmethod
    def assistant(cls, content: str | None, tool_calls: Sequence[ToolCall] = ()) -> Message:
        return cls(role="assistant", content=content, tool_calls=list(tool_calls))

    @classmethod
    def tool(cls, tool_call_id: str, name: str, content: str) -> Message:
        return cls(role="tool", content=content, tool_call_id=tool_call_id, name=name)

    def text(self) -> str:
        """All the text a token budget has to pay for, tool calls included."""
        parts = [self.content or ""]
        parts.extend(f"{c.name}({c.raw_arguments or json.dumps(c.arguments)})" for c in self.tool_calls)
        return "\n".join(p for p in parts if p)


class ToolDefinition(BaseModel):
    """What the model sees of a tool: a name, a description and a JSON schema for its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class LLMResponse(BaseModel):
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    """One model call: the conversation so far, the tools offered and how the model may use them."""

    messages: list[Message]
    tools: list[ToolDefinition] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"

    @property
    def offered_tools(self) -> list[ToolDefinition]:
        """The tools the model may call: none when ``tool_choice`` is ``"none"``."""
        return self.tools if self.tool_choice != "none" else []


class LLM(ABC):
    """A chat model that may call tools.

    Callers use ``chat``; a client implements ``complete``, the one request every call becomes.
    Implementations raise ``LLMError`` (and only that) once their own retries are spent, and
    report usage on every response so runs can be metered.
    """

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolDefinition] = (),
        tool_choice: ToolChoice = "auto",
    ) -> LLMResponse:
        return await self.complete(ChatRequest(list(messages), list(tools), tool_choice))

    @abstractmethod
    async def complete(self, request: ChatRequest) -> LLMResponse: ...


class LLMWrapper(LLM):
    """A model client around another, the one hook point on model calls (metering, journaling,
    telemetry): override ``complete`` and await ``self.inner.complete(request)`` in it."""

    def __init__(self, inner: LLM) -> None:
        self.inner = inner

    async def complete(self, request: ChatRequest) -> LLMResponse:
        return await self.inner.complete(request)


class SharedLLM(LLM):
    """An ``LLM`` one process shares between runs (``OpenAICompatible``, ``LocalGGUF``).

    ``with_settings`` is a view tuned for one run that shares the connections or the weights;
    ``aclose`` releases what the client holds, at shutdown (``async with`` calls it).
    """

    temperature: float | None
    max_tokens: int | None

    def with_settings(self, *, temperature: float | None = None, max_tokens: int | None = None) -> Self:
        """This client with other sampling settings (None keeps the current one), sharing what
        the original holds."""
        view = copy.copy(self)
        if temperature is not None:
            view.temperature = temperature
        if max_tokens is not None:
            view.max_tokens = max_tokens
        return view

    @abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
