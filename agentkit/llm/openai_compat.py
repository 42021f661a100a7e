"""Any Chat Completions server (OpenAI, vLLM, llama.cpp, Ollama, LM Studio) through the official SDK.

We disable the SDK's own retries and retry here instead, so the policy (which statuses, how long,
``Retry-After``) is one visible piece of code, cancellation interrupts a backoff sleep promptly,
and the final failure is one ``LLMError`` that says what to check.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import anyio
import openai

from agentkit.llm.base import (
    LLMError,
    LLMResponse,
    Message,
    ToolChoice,
    ToolDefinition,
    messages_to_openai,
    response_from_openai_dict,
    tool_choice_to_openai,
)

log = logging.getLogger(__name__)

_MAX_RETRY_AFTER_S = 30.0


class OpenAICompatible:
    """An ``LLM`` over HTTP.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``; a local
    server that needs no key gets a placeholder. ``stream=True`` reads the answer as SSE (some
    proxies only stream). ``tool_results_as_user`` works around chat templates that drop ``tool``
    messages.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str = "gpt-4o-mini",
        timeout_s: float = 60,
        max_retries: int = 3,
        temperature: float | None = None,
        max_tokens: int | None = None,
        *,
        seed: int | None = None,
        stream: bool = False,
        retry_base_delay_s: float = 0.5,
        tool_results_as_user: bool = False,
        parallel_tool_calls: bool | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.stream = stream
        self.retry_base_delay_s = retry_base_delay_s
        self.tool_results_as_user = tool_results_as_user
        self.parallel_tool_calls = parallel_tool_calls
        self.extra_body = extra_body
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key and self.base_url is None:
            raise LLMError(
                "OpenAICompatible needs an API key for api.openai.com: pass api_key= or set "
                "OPENAI_API_KEY, or pass base_url= for a local server."
            )
        self._client = openai.AsyncOpenAI(
            api_key=key or "not-needed",
            base_url=self.base_url,
            timeout=timeout_s,
            max_retries=0,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> OpenAICompatible:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _request(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], tool_choice: ToolChoice
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages_to_openai(messages, tool_results_as_user=self.tool_results_as_user),
        }
        if tools and tool_choice != "none":
            body["tools"] = [t.to_openai() for t in tools]
            body["tool_choice"] = tool_choice_to_openai(tool_choice)
            if self.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = self.parallel_tool_calls
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.seed is not None:
            body["seed"] = self.seed
        if self.extra_body:
            body["extra_body"] = self.extra_body
        return body

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolDefinition] = (),
        tool_choice: ToolChoice = "auto",
    ) -> LLMResponse:
        body = self._request(messages, tools, tool_choice)
        offered = tools if tool_choice != "none" else ()
        attempt = 0
        while True:
            try:
                if self.stream:
                    return await self._chat_stream(body, offered)
                completion = await self._client.chat.completions.create(**body)
                return response_from_openai_dict(completion.model_dump(), offered)
            except openai.APIStatusError as exc:
                retryable = exc.status_code == 429 or exc.status_code >= 500
                error = LLMError(
                    f"The model server at {self.base_url or 'api.openai.com'} answered HTTP {exc.status_code}: "
                    f"{_short(exc.message)}. "
                    + (
                        "It kept failing after retries; check the server's health and rate limits."
                        if retryable
                        else "Check the model name, the API key and the request options."
                    ),
                    retryable=retryable,
                    status_code=exc.status_code,
                )
                retry_after = _retry_after(exc)
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                error = LLMError(
                    f"Cannot reach the model server at {self.base_url or 'api.openai.com'} ({exc}); "
                    f"check that it is running and that timeout_s={self.timeout_s} is long enough.",
                    retryable=True,
                )
                retry_after = None
            except openai.OpenAIError as exc:
                raise LLMError(f"The model call failed: {exc}") from exc
            if not error.retryable or attempt >= self.max_retries:
                raise error
            delay = retry_after if retry_after is not None else self.retry_base_delay_s * (2**attempt)
            attempt += 1
            log.warning(
                "model call failed (%s); retry %d/%d in %.2fs", error, attempt, self.max_retries, delay
            )
            await anyio.sleep(delay)

    async def _chat_stream(self, body: dict[str, Any], tools: Sequence[ToolDefinition]) -> LLMResponse:
        """Accumulate SSE chunks into the same JSON shape as a non-streamed completion."""
        stream = await self._client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        model: str | None = None
        async with stream:
            async for chunk in stream:
                data = chunk.model_dump()
                model = data.get("model") or model
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        content.append(delta["content"])
                    for part in delta.get("tool_calls") or []:
                        slot = calls.setdefault(
                            part.get("index") or 0, {"id": "", "name": "", "arguments": ""}
                        )
                        # Some servers send a fresh random id on every chunk: keep the first one.
                        slot["id"] = slot["id"] or part.get("id") or ""
                        function = part.get("function") or {}
                        slot["name"] += function.get("name") or ""
                        slot["arguments"] += function.get("arguments") or ""
                    finish_reason = choice.get("finish_reason") or finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for _, c in sorted(calls.items())
            ]
        return response_from_openai_dict(
            {
                "model": model,
                "choices": [{"message": message, "finish_reason": finish_reason}],
                "usage": usage,
            },
            tools,
        )


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return None


def _short(text: str, limit: int = 300) -> str:
    text = text if isinstance(text, str) else json.dumps(text)
    return text if len(text) <= limit else text[:limit] + "..."
