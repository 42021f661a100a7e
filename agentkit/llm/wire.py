"""Helpers for the clients that speak the Chat Completions wire format (OpenAI-compatible
servers and llama.cpp): request messages out, tolerant parsing of responses and tool calls in.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from agentkit.llm.base import LLMError, LLMResponse, Message, ToolCall, ToolChoice, ToolDefinition, Usage


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


def parse_arguments(raw: Any) -> tuple[dict[str, Any], str | None]:
    """Arguments as a dict, plus the raw text when it was not a JSON object.

    Local servers send arguments as a JSON string, a dict, a doubly-encoded string or nothing.
    """
    if raw is None or raw == "":
        return {}, None
    if isinstance(raw, Mapping):
        return dict(raw), None
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return {}, raw
        if isinstance(value, str):  # doubly encoded
            return parse_arguments(value) if value.strip().startswith("{") else ({}, raw)
        if isinstance(value, dict):
            return value, None
        return {}, raw
    return {}, str(raw)


def normalise_tool_calls(calls: Sequence[ToolCall]) -> list[ToolCall]:
    """Give every call a unique, non-empty id.

    Some local servers send no id, the same id for every call, or a fresh random id on each
    stream chunk; results are matched to calls by id, so ids must be unique within a turn.
    """
    seen: set[str] = set()
    out: list[ToolCall] = []
    for call in calls:
        call_id = call.id
        if not call_id or call_id in seen:
            call_id = new_call_id()
        seen.add(call_id)
        out.append(call if call_id == call.id else call.model_copy(update={"id": call_id}))
    return out


_TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def extract_text_tool_calls(content: str | None, tools: Sequence[ToolDefinition]) -> list[ToolCall]:
    """Tool calls a model wrote as text instead of using the tool-call channel.

    Small local models (and servers whose chat template does not parse tool calls) answer with
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` or a bare JSON object. Only names
    of offered tools are accepted, so an ordinary JSON final answer is never mistaken for a call.
    """
    if not content or not tools:
        return []
    names = {t.name for t in tools}
    candidates = [m.group(1) for m in _TOOL_CALL_TAG.finditer(content)] or [content.strip()]
    calls: list[ToolCall] = []
    for candidate in candidates:
        text = candidate.strip()
        if text.startswith("```"):
            text = text.strip("`").removeprefix("json").strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, dict):
                continue
            name = item.get("name") or item.get("function") or item.get("tool")
            if not isinstance(name, str) or name not in names:
                continue
            args, raw = parse_arguments(item.get("arguments", item.get("parameters", {})))
            calls.append(ToolCall(id=new_call_id(), name=name, arguments=args, raw_arguments=raw))
    return calls


def response_from_openai_dict(data: Mapping[str, Any], tools: Sequence[ToolDefinition] = ()) -> LLMResponse:
    """An ``LLMResponse`` from a Chat Completions JSON body, tolerant of local-server quirks."""
    choices = data.get("choices") or []
    if not choices:
        raise LLMError("The model returned no choices; check that the server supports chat completions.")
    choice = choices[0]
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    calls: list[ToolCall] = []
    for raw_call in message.get("tool_calls") or []:
        function = raw_call.get("function") if isinstance(raw_call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(function, Mapping) or not name:
            continue  # not a usable call (no function name): skipped, as a nameless call always was
        args, raw = parse_arguments(function.get("arguments"))
        calls.append(ToolCall(id=raw_call.get("id") or "", name=name, arguments=args, raw_arguments=raw))
    function_call = message.get("function_call")  # legacy single-call field
    if not calls and isinstance(function_call, dict) and function_call.get("name"):
        args, raw = parse_arguments(function_call.get("arguments"))
        calls.append(ToolCall(id="", name=function_call["name"], arguments=args, raw_arguments=raw))
    if not calls:
        calls = extract_text_tool_calls(content, tools)
        if calls:
            content = None
    usage = data.get("usage") or {}
    return LLMResponse(
        content=content,
        tool_calls=normalise_tool_calls(calls),
        usage=Usage(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        ),
        finish_reason=choice.get("finish_reason"),
        model=data.get("model"),
    )


def messages_to_openai(
    messages: Sequence[Message], *, tool_results_as_user: bool = False
) -> list[dict[str, Any]]:
    """Messages in the Chat Completions request shape.

    ``tool_results_as_user`` rewrites tool results as user messages, for chat templates that
    silently drop ``tool`` messages (the model would otherwise never see its observations); the
    assistant's tool calls are then written out as text too, so the pairing stays readable.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            if tool_results_as_user:
                out.append({"role": "user", "content": f"Result of tool {m.name or ''}: {m.content or ''}"})
            else:
                item: dict[str, Any] = {
                    "role": "tool",
                    "tool_call_id": m.tool_call_id,
                    "content": m.content or "",
                }
                if m.name:
                    item["name"] = m.name
                out.append(item)
        elif m.role == "assistant" and m.tool_calls:
            if tool_results_as_user:
                calls = "; ".join(f"{c.name}({json.dumps(c.arguments)})" for c in m.tool_calls)
                text = f"{m.content}\n" if m.content else ""
                out.append({"role": "assistant", "content": f"{text}Calling tool: {calls}"})
            else:
                out.append(
                    {
                        "role": "assistant",
                        "content": m.content,
                        "tool_calls": [
                            {
                                "id": c.id,
                                "type": "function",
                                "function": {
                                    "name": c.name,
                                    "arguments": c.raw_arguments or json.dumps(c.arguments),
                                },
                            }
                            for c in m.tool_calls
                        ],
                    }
                )
        else:
            out.append({"role": m.role, "content": m.content or ""})
    return out


def tool_choice_to_openai(choice: ToolChoice) -> Any:
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}
