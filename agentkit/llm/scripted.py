"""A model that replays given responses, for deterministic tests of agents and tools.

Like pydantic-ai's ``FunctionModel``: each scripted item is a response, a plain string (a final
answer), or a function of the request, so a test can assert on what the agent sent and answer
accordingly. Every request is recorded in ``calls``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agentkit.llm.base import (
    LLM,
    ChatRequest,
    LLMError,
    LLMResponse,
    Message,
    ToolCall,
    Usage,
    estimate_tokens,
)
from agentkit.llm.wire import normalise_tool_calls

ScriptFunction = Callable[[ChatRequest], "LLMResponse | str | Awaitable[LLMResponse | str]"]
ScriptItem = LLMResponse | str | Exception | ScriptFunction


def call(name: str, /, **arguments: Any) -> LLMResponse:
    """A response that calls one tool; ``ScriptedLLM([call("add", a=1, b=2), "3"])``."""
    return LLMResponse(tool_calls=[ToolCall(id="", name=name, arguments=arguments)])


def calls(*pairs: tuple[str, dict[str, Any]]) -> LLMResponse:
    """A response with several tool calls in one turn (parallel tool calling)."""
    return LLMResponse(tool_calls=[ToolCall(id="", name=n, arguments=a) for n, a in pairs])


class ScriptedLLM(LLM):
    """Replays ``responses`` in order; raises ``LLMError`` when the script runs out.

    An ``Exception`` item is raised from that call (wrap it in ``LLMError`` to test failed runs).
    Usage is estimated from the text when a response does not carry its own, so usage sums are
    meaningful in tests.
    """

    def __init__(self, responses: Sequence[ScriptItem], *, repeat_last: bool = False) -> None:
        self._responses = list(responses)
        self._repeat_last = repeat_last
        self.calls: list[ChatRequest] = []

    @property
    def remaining(self) -> int:
        return max(0, len(self._responses) - len(self.calls))

    async def complete(self, request: ChatRequest) -> LLMResponse:
        request = dataclasses.replace(request, messages=[m.model_copy() for m in request.messages])
        index = len(self.calls)
        self.calls.append(request)
        if index >= len(self._responses):
            if not (self._repeat_last and self._responses):
                raise LLMError(
                    f"ScriptedLLM ran out of responses after {len(self._responses)} call(s); "
                    "add one response per model call the agent makes."
                )
            index = len(self._responses) - 1
        item = self._responses[index]
        if isinstance(item, Exception):
            raise item
        if callable(item) and not isinstance(item, LLMResponse):
            produced = item(request)
            item = await produced if inspect.isawaitable(produced) else produced
        response = LLMResponse(content=item) if isinstance(item, str) else item.model_copy(deep=True)
        response.tool_calls = normalise_tool_calls(response.tool_calls)
        if response.usage.total_tokens == 0:
            response.usage = Usage(
                input_tokens=sum(estimate_tokens(m.text()) for m in request.messages),
                output_tokens=estimate_tokens(
                    Message.assistant(response.content, response.tool_calls).text()
                ),
            )
        return response
