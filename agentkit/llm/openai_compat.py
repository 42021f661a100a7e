"""Any Chat Completions server (OpenAI, vLLM, llama.cpp, Ollama, LM Studio) through the official SDK.

Our own retry policy, and nothing from the environment (``OPENAI_*`` is undone).
See docs/agentkit.md, "Models".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import openai
from openai.types.chat import ChatCompletionChunk

from agentkit.llm.base import ChatRequest, LLMError, LLMResponse, SharedLLM, ToolDefinition
from agentkit.llm.wire import messages_to_openai, response_from_openai_dict, tool_choice_to_openai

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_MAX_RETRY_AFTER_S = 30.0
_UNUSED_KEY = "agentkit-no-key"
"""Satisfies the SDK's constructor check; never sent, because every request sets its own
``Authorization`` (the caller's key, or no header at all)."""
_ENDPOINT_HINT = "check that base_url points at an OpenAI-compatible /v1 endpoint."


class OpenAICompatible(SharedLLM):
    """An ``LLM`` over HTTP, configured only by its arguments.

    ``base_url`` defaults to api.openai.com, which needs ``api_key``; a local server that needs no
    key gets no ``Authorization`` header. ``organization`` and ``project`` are sent only when
    given. No ``OPENAI_*`` variable is read: pass ``api_key=os.environ["OPENAI_API_KEY"]`` to use
    one. ``stream=True`` reads the answer as SSE (some proxies only stream).
    ``tool_results_as_user`` works around chat templates that drop ``tool`` messages.
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
        organization: str | None = None,
        project: str | None = None,
        seed: int | None = None,
        stream: bool = False,
        retry_base_delay_s: float = 0.5,
        tool_results_as_user: bool = False,
        parallel_tool_calls: bool | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.base_url = base_url or DEFAULT_BASE_URL
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
        if not api_key and urlsplit(self.base_url).hostname == "api.openai.com":
            raise LLMError(
                "OpenAICompatible needs an API key for api.openai.com: pass api_key= (it never reads "
                'OPENAI_API_KEY itself; use api_key=os.environ["OPENAI_API_KEY"] to use that), or '
                "pass base_url= for a local server."
            )
        # Per request, so it overrides whatever the SDK would derive; ``omit`` sends no header.
        self._auth: dict[str, str | openai.Omit] = {
            "Authorization": f"Bearer {api_key}" if api_key else openai.omit
        }
        self._owner: OpenAICompatible = self  # views made by ``with_settings`` share it
        self._client = _explicit_client(
            base_url=self.base_url,
            api_key=api_key or _UNUSED_KEY,
            organization=organization,
            project=project,
            timeout_s=timeout_s,
        )

    async def aclose(self) -> None:
        """Close the connection pool (the original client only: its ``with_settings`` views,
        which many tasks use at once, share it)."""
        if self._owner is self:
            await self._client.close()

    def _request(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages_to_openai(request.messages, tool_results_as_user=self.tool_results_as_user),
        }
        if request.offered_tools:
            body["tools"] = [t.to_openai() for t in request.offered_tools]
            body["tool_choice"] = tool_choice_to_openai(request.tool_choice)
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
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: ChatRequest) -> LLMResponse:
        body = self._request(request)
        attempt = 0
        while True:
            try:
                return await self._post(body, request.offered_tools)
            except openai.APIStatusError as exc:
                retryable = exc.status_code == 429 or exc.status_code >= 500
                error = LLMError(
                    f"The model server at {self.base_url} answered HTTP {exc.status_code}: "
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
            except (openai.APIConnectionError, openai.APITimeoutError, httpx2.TransportError) as exc:
                # httpx2 errors come from reading the body, after the SDK handed us the response.
                error = LLMError(
                    f"Cannot reach the model server at {self.base_url} ({exc or type(exc).__name__}); "
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

    async def _post(self, body: dict[str, Any], tools: Sequence[ToolDefinition]) -> LLMResponse:
        """One request; the body is read and checked here, not by the SDK.

        The SDK hands back a bare ``str`` for a body that is not JSON and an unvalidated object for
        JSON of another shape, which used to surface as ``AttributeError`` far from the cause. A
        server asked to stream that answers plain JSON (some proxies do) is read as a completion.
        """
        if not self.stream:
            # The client's generic ``post`` sends the JSON body as it is: ``chat.completions.create``
            # first walks it through the SDK's TypedDicts (a fifth of a busy worker's CPU).
            payload = {k: v for k, v in body.items() if k != "extra_body"} | body.get("extra_body", {})
            response = await self._client.post(
                "/chat/completions", cast_to=httpx2.Response, body=payload, options={"headers": self._auth}
            )
            content_type = response.headers.get("content-type", "")
            return response_from_openai_dict(
                self._completion_json(response.status_code, content_type, response.content), tools
            )
        async with self._client.chat.completions.with_streaming_response.create(
            **body, extra_headers=self._auth
        ) as raw:
            content_type = raw.headers.get("content-type", "")
            if _media_type(content_type) == "text/event-stream":
                return await self._read_stream(
                    await raw.parse(to=openai.AsyncStream[ChatCompletionChunk]), tools
                )
            data = await raw.read()
            status = raw.status_code
        return response_from_openai_dict(self._completion_json(status, content_type, data), tools)

    def _completion_json(self, status: int, content_type: str, data: bytes) -> dict[str, Any]:
        try:
            parsed = json.loads(data)
        except ValueError:  # not JSON, or not even UTF-8
            raise LLMError(
                f"The model server at {self.base_url} answered HTTP {status} with a body that is not a "
                f"chat completion ({content_type or 'no content type'}, {_preview(data)}): {_ENDPOINT_HINT}"
            ) from None
        problem = _completion_problem(parsed)
        if problem is not None:
            raise LLMError(
                f"The model server at {self.base_url} answered HTTP {status} with JSON that is not a "
                f"chat completion ({problem}, {_preview(data)}): {_ENDPOINT_HINT}"
            )
        result: dict[str, Any] = parsed
        return result

    async def _read_stream(
        self, stream: openai.AsyncStream[ChatCompletionChunk], tools: Sequence[ToolDefinition]
    ) -> LLMResponse:
        """Accumulate SSE chunks into the same JSON shape as a non-streamed completion."""
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        model: str | None = None
        async with stream:
            try:
                async for chunk in stream:
                    if not isinstance(chunk, openai.BaseModel):
                        raise self._bad_chunk(chunk)
                    data = chunk.model_dump(warnings=False)
                    try:
                        model = data.get("model") or model
                        if data.get("usage"):
                            usage = dict(data["usage"])
                        for choice in data.get("choices") or []:
                            delta = choice.get("delta") or {}
                            if delta.get("content"):
                                content.append(str(delta["content"]))
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
                    except (AttributeError, TypeError, ValueError):
                        raise self._bad_chunk(data) from None
            except ValueError:  # the SDK's json.loads of a data line that is not JSON
                raise LLMError(
                    f"The model server at {self.base_url} streamed an event that is not JSON: {_ENDPOINT_HINT}"
                ) from None
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

    def _bad_chunk(self, chunk: object) -> LLMError:
        text = json.dumps(chunk, default=str) if not isinstance(chunk, str) else chunk
        return LLMError(
            f"The model server at {self.base_url} streamed an event that is not a chat completion "
            f"chunk ({_preview(text.encode())}): {_ENDPOINT_HINT}"
        )


def _explicit_client(
    *, base_url: str, api_key: str, organization: str | None, project: str | None, timeout_s: float
) -> openai.AsyncOpenAI:
    """An SDK client holding only these values.

    The SDK reads OPENAI_API_KEY, OPENAI_ADMIN_KEY, OPENAI_ORG_ID, OPENAI_PROJECT_ID,
    OPENAI_WEBHOOK_SECRET and OPENAI_BASE_URL for arguments left ``None``, and always merges
    OPENAI_CUSTOM_HEADERS into its default headers (no argument turns that off). Everything it may
    have taken from the environment is overwritten here; the integration tests pin it with all of
    those variables set.
    """
    client = openai.AsyncOpenAI(
        api_key=api_key,
        organization=organization,
        project=project,
        base_url=base_url,
        timeout=timeout_s,
        max_retries=0,
    )
    client.organization = organization
    client.project = project
    client.admin_api_key = None
    client.webhook_secret = None
    client._custom_headers = {}  # what OPENAI_CUSTOM_HEADERS added; we pass no default_headers
    return client


def _completion_problem(data: object) -> str | None:
    """Why ``data`` is not a Chat Completions body, or ``None``; an empty ``choices`` passes
    (``response_from_openai_dict`` says the model returned no choices)."""
    if not isinstance(data, Mapping):
        return f"a JSON {_json_kind(data)}, not an object"
    if "choices" not in data:
        error = data.get("error")
        if error:
            message = error.get("message") if isinstance(error, Mapping) else error
            return f"an error instead of choices: {_short(str(message), 200)}"
        return "no 'choices' field"
    choices = data["choices"]
    if not isinstance(choices, list):
        return f"'choices' is a JSON {_json_kind(choices)}, not a list"
    if choices and not isinstance(choices[0], Mapping):
        return f"'choices[0]' is a JSON {_json_kind(choices[0])}, not an object"
    if choices and not isinstance(choices[0].get("message") or {}, Mapping):
        return "'choices[0].message' is not an object"
    if not isinstance(data.get("usage") or {}, Mapping):
        return "'usage' is not an object"
    return None


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else "object"


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _preview(data: bytes, limit: int = 80) -> str:
    text = " ".join(data.decode("utf-8", errors="replace").split())
    if not text:
        return "an empty body"
    return f"starts with {text[:limit] + '...' if len(text) > limit else text!r}"


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
