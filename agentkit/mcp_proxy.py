"""Calling downstream MCP servers as agent tools, through a caller the host injects.

The host's ``McpCaller`` decides where calls go; agentkit shapes the calls and maps the results.
See docs/agentkit.md, "MCP tools", "Progress of long tool calls" and "The idempotency key".
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import mcp.types as mcp_types

from agentkit.errors import ToolError
from agentkit.journal import IDEMPOTENCY_META_KEY, current_call_key
from agentkit.llm.base import ToolCall
from agentkit.progress import ProgressCallback, current_progress
from agentkit.tools import Tool, ToolHandler, ToolResult

log = logging.getLogger(__name__)

PROXY_TOOL_NAME = "mcp_proxy_tool"
SEPARATOR = "__"


@runtime_checkable
class McpCaller(Protocol):
    """Where MCP calls go. A call that fails (forbidden server, server down, unknown tool, a
    result with ``isError``) raises ``ToolError`` with the one message the model should read, or
    returns the ``isError`` result, which the tools word with ``error_from_mcp``. Any other
    exception reaches the model as ``Calling 't' on MCP server 's' failed: <type>: <text>.``

    ``progress_callback``, when given, should receive the downstream server's progress
    notifications for this call; ``meta``, when given, is the request's ``_meta`` (it carries
    ``IDEMPOTENCY_META_KEY``). The ``mcp`` SDK's ``call_tool`` takes both keywords. Both are
    optional for implementations: the tools pass only the keywords ``call_tool`` accepts.
    ``list_tools`` also gives the annotations the tools read idempotency from.
    """

    async def list_tools(self, server: str) -> list[mcp_types.Tool]: ...

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        progress_callback: ProgressCallback | None = None,
        meta: dict[str, Any] | None = None,
    ) -> mcp_types.CallToolResult: ...


def _takes(caller: McpCaller, keyword: str) -> bool:
    """Whether ``caller.call_tool`` accepts ``keyword`` (callers written before it do not)."""
    try:
        parameters = inspect.signature(caller.call_tool).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in parameters)


def idempotent_from_annotations(annotations: mcp_types.ToolAnnotations | None) -> bool | None:
    """``Tool.idempotent`` from MCP tool annotations: what a resumed run may safely repeat.

    ``idempotentHint`` or ``readOnlyHint`` true means repeating is harmless (``True``); either
    explicitly false, with neither true, means it may not be (``False``); no hint is ``None``.
    """
    if annotations is None:
        return None
    hints = (annotations.idempotent_hint, annotations.read_only_hint)
    if True in hints:
        return True
    if False in hints:
        return False
    return None


def _resource_text(resource: mcp_types.TextResourceContents | mcp_types.BlobResourceContents) -> str:
    """An embedded resource as the model reads it: text with its URI, binary as a labelled placeholder."""
    mime = f" ({resource.mime_type})" if resource.mime_type else ""
    if isinstance(resource, mcp_types.TextResourceContents):
        return f"[resource {resource.uri}{mime}]\n{resource.text}"
    return f"[binary resource {resource.uri}{mime}, {len(resource.blob)} base64 characters]"


def result_from_mcp(result: mcp_types.CallToolResult, *, server: str = "", tool: str = "") -> ToolResult:
    """Map an MCP ``CallToolResult`` to an observation without losing anything.

    The model reads a text rendering (text verbatim, resources with their URI, binary content as a
    labelled placeholder, structured content as JSON when there is no text); ``parts`` keeps every
    content block as MCP JSON and ``structured`` the structured content, for the host and events.
    A result with ``isError`` is read as ``error_from_mcp`` words it.
    """
    if result.is_error:
        error = error_from_mcp(result, server=server, tool=tool)
        return ToolResult(content=error.message, is_error=True, parts=error.parts)
    structured = result.structured_content
    return ToolResult(
        content=_render(result),
        parts=_parts(result),
        structured=dict(structured) if isinstance(structured, dict) else None,
    )


def error_from_mcp(result: mcp_types.CallToolResult, *, server: str = "", tool: str = "") -> ToolError:
    """The ``ToolError`` for a result the downstream tool marked ``isError``: its text, said once
    to be the tool's error (a tool message carries no error flag the model could see)."""
    where = f"{server}/{tool}" if server else tool
    text = _render(result)
    return ToolError(f"The tool {where} reported an error: {text}" if where else text, parts=_parts(result))


def _parts(result: mcp_types.CallToolResult) -> list[dict[str, Any]]:
    return [b.model_dump(mode="json", by_alias=True, exclude_none=True) for b in result.content]


def _render(result: mcp_types.CallToolResult) -> str:
    texts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            texts.append(block.text)
        elif isinstance(block, mcp_types.ImageContent):
            texts.append(f"[image {block.mime_type}, {len(block.data)} base64 characters]")
        elif isinstance(block, mcp_types.AudioContent):
            texts.append(f"[audio {block.mime_type}, {len(block.data)} base64 characters]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            texts.append(_resource_text(block.resource))
        elif isinstance(block, mcp_types.ResourceLink):
            texts.append(
                f"[resource link {block.uri}" + (f": {block.description}" if block.description else "") + "]"
            )
        else:  # a content type newer than this code: keep its JSON
            texts.append(json.dumps(block.model_dump(mode="json", by_alias=True, exclude_none=True)))
    structured = result.structured_content
    if structured is not None and not any(isinstance(b, mcp_types.TextContent) for b in result.content):
        texts.append(json.dumps(structured))
    return "\n".join(texts)


async def _call(caller: McpCaller, server: str, tool: str, arguments: dict[str, Any]) -> ToolResult:
    progress = current_progress()
    key = current_call_key()
    options: dict[str, Any] = {}
    if progress is not None and _takes(caller, "progress_callback"):
        options["progress_callback"] = progress
    if key is not None and _takes(caller, "meta"):
        options["meta"] = {IDEMPOTENCY_META_KEY: key}
    try:
        result = await caller.call_tool(server, tool, arguments, **options)
    except ToolError:
        raise  # the caller wrote it for the model
    except Exception as exc:
        detail = str(exc).rstrip(".")  # most messages end with a period: one is enough
        raise ToolError(
            f"Calling {tool!r} on MCP server {server!r} failed: {type(exc).__name__}: {detail}."
        ) from exc
    if result.is_error:
        raise error_from_mcp(result, server=server, tool=tool)
    return result_from_mcp(result)


class _ProxyTool(Tool):
    """The proxy tool: its idempotency is that of the downstream tool each call targets."""

    def __init__(self, caller: McpCaller, handler: ToolHandler) -> None:
        super().__init__(
            PROXY_TOOL_NAME,
            "Call a tool on a downstream MCP server. Give the server name, the tool name and the "
            "tool's arguments as an object.",
            {
                "type": "object",
                "properties": {
                    "server": {"type": "string", "description": "Name of the MCP server."},
                    "tool": {"type": "string", "description": "Name of the tool on that server."},
                    "arguments": {"type": "object", "description": "Arguments for the tool."},
                },
                "required": ["server", "tool"],
            },
            handler,
        )
        self.caller = caller

    async def idempotent_for(self, call: ToolCall) -> bool | None:
        """The target tool's annotations, listed through the caller; ``None`` if it cannot say."""
        server, name = call.arguments.get("server"), call.arguments.get("tool")
        if not isinstance(server, str) or not isinstance(name, str):
            return None
        try:
            listed = await self.caller.list_tools(server)
        except Exception as exc:
            log.warning("cannot list the tools of MCP server %r to decide a re-run: %s", server, exc)
            return None
        for downstream in listed:
            if downstream.name == name:
                return idempotent_from_annotations(downstream.annotations)
        return None


def mcp_proxy_tool(caller: McpCaller) -> Tool:
    """One tool, ``mcp_proxy_tool(server, tool, arguments)``, that reaches any allowed server.

    Flexible (new servers need no new tools) but harder for small models than the flat tools of
    ``expand_server_tools``; offer both when in doubt.
    """

    async def handler(values: dict[str, Any]) -> Any:
        server, name, arguments = values.get("server"), values.get("tool"), values.get("arguments", {})
        if not isinstance(server, str) or not server or not isinstance(name, str) or not name:
            raise ToolError(
                f'{PROXY_TOOL_NAME} needs "server" and "tool" as non-empty strings and "arguments" as an object.'
            )
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ToolError(
                    f'"arguments" of {PROXY_TOOL_NAME} must be a JSON object, got {arguments!r}.'
                ) from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolError(
                f'"arguments" of {PROXY_TOOL_NAME} must be an object, got {type(arguments).__name__}.'
            )
        return await _call(caller, server, name, arguments)

    return _ProxyTool(caller, handler)


def flat_tool_name(server: str, tool: str) -> str:
    """``server__tool`` with characters OpenAI-style APIs refuse replaced by ``_``, cut to 64."""
    name = f"{server}{SEPARATOR}{tool}"
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else "_" for ch in name)
    return cleaned[:64]


def _flat_tool(caller: McpCaller, server: str, downstream: mcp_types.Tool) -> Tool:
    schema = dict(downstream.input_schema or {})
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    required = [r for r in schema.get("required", []) if isinstance(r, str)]
    tool_name = downstream.name

    async def handler(values: dict[str, Any]) -> Any:
        missing = [r for r in required if r not in values]
        if missing:
            raise ToolError(
                f"Missing required argument(s) {', '.join(missing)} for {server}/{tool_name}; "
                f"send arguments matching its schema: {json.dumps(schema)}"
            )
        return await _call(caller, server, tool_name, values)

    description = downstream.description or downstream.title or f"{tool_name} on {server}"
    return Tool(
        flat_tool_name(server, tool_name),
        f"[{server}] {description}",
        schema,
        handler,
        idempotent=idempotent_from_annotations(downstream.annotations),
    )


async def expand_server_tools(
    caller: McpCaller, servers: Sequence[str], *, strict: bool = False
) -> list[Tool]:
    """One flat tool per downstream tool, named ``server__tool`` with the downstream schema.

    Every flat tool goes through ``caller.call_tool`` like the proxy does, so the host's routing
    and permissions apply unchanged. A server whose tools cannot be listed is logged and left out
    (the agent can still run with the rest), unless ``strict`` is set, which re-raises.
    """
    tools: list[Tool] = []
    for server in servers:
        try:
            listed = await caller.list_tools(server)
        except Exception as exc:
            if strict:
                raise
            log.warning("cannot list the tools of MCP server %r, leaving them out: %s", server, exc)
            continue
        tools.extend(_flat_tool(caller, server, t) for t in listed)
    return tools
