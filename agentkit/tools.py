"""Tools: plain functions the model can call, with schemas derived from their signatures.

Every failure becomes an error observation the model can read, never an exception out of the
loop. See docs/agentkit.md, "Tools".
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any, Literal, get_type_hints, overload

import anyio.to_thread
from griffe import Docstring, DocstringSectionKind
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from agentkit.errors import ToolDefinitionError, ToolError, ToolRegistryError, validation_problems
from agentkit.llm.base import ToolCall, ToolDefinition

ToolHandler = Callable[[dict[str, Any]], Awaitable[Any]]

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolResult(BaseModel):
    """What a tool call produced.

    ``content`` is the text the model reads. ``parts`` keeps rich content (MCP images, resources,
    structured output) as JSON so nothing is lost for the host, events and the database, even
    where the model only sees a text rendering of it.
    """

    call_id: str = ""
    name: str = ""
    content: str
    is_error: bool = False
    parts: list[dict[str, Any]] = Field(default_factory=list)
    structured: dict[str, Any] | None = None


class Tool:
    """A callable with a name, a description and a JSON schema, ready to offer to a model.

    ``idempotent`` says whether running the same call twice has the effect of running it once
    (``None``: unknown). An agent resuming a run re-runs a call that was in flight at the restart
    only when it is ``True`` (see ``agentkit.journal``), so leave it ``None`` unless you know.
    """

    def __init__(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any],
        handler: ToolHandler,
        *,
        args_model: type[BaseModel] | None = None,
        idempotent: bool | None = None,
    ) -> None:
        if not _TOOL_NAME.match(name):
            raise ToolDefinitionError(
                f"Tool name {name!r} is not accepted by OpenAI-style APIs: use 1-64 letters, digits, '_' or '-'."
            )
        self.name = name
        self.description = description
        self.parameters = parameters
        self._handler = handler
        self.args_model = args_model
        self.idempotent = idempotent

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def definition(self) -> ToolDefinition:
        return ToolDefinition(name=self.name, description=self.description, parameters=self.parameters)

    async def idempotent_for(self, call: ToolCall) -> bool | None:
        """Whether this particular call is idempotent; ``idempotent`` unless a subclass knows
        better (``mcp_proxy_tool`` asks the downstream tool the call targets)."""
        return self.idempotent

    async def invoke(self, arguments: dict[str, Any], *, call_id: str = "") -> ToolResult:
        """Run the tool; never raises except for cancellation.

        A ``ToolError`` becomes the observation as it is (its message, its parts): it was written
        for the model. Any other exception is reported with its type, once.
        """

        def error(text: str, parts: list[dict[str, Any]] | None = None) -> ToolResult:
            return ToolResult(call_id=call_id, name=self.name, content=text, is_error=True, parts=parts or [])

        values: dict[str, Any] = arguments
        if self.args_model is not None:
            try:
                parsed = self.args_model.model_validate(arguments)
            except ValidationError as exc:
                problems = "; ".join(validation_problems(exc, root="arguments"))
                return error(
                    f"Invalid arguments for tool {self.name}: {problems}. "
                    f"Call it again with arguments matching its schema: {json.dumps(self.parameters)}"
                )
            values = {k: getattr(parsed, k) for k in type(parsed).model_fields}
        try:
            output = await self._handler(values)
        except ToolError as exc:
            return error(exc.message, exc.parts)
        except Exception as exc:
            return error(f"Tool {self.name} raised {type(exc).__name__}: {exc}")
        result = to_tool_result(output)
        return result.model_copy(update={"call_id": call_id, "name": self.name})


def to_tool_result(output: Any) -> ToolResult:
    """Render what a function returned as an observation (JSON for structured values)."""
    if isinstance(output, ToolResult):
        return output
    if output is None:
        return ToolResult(content="")
    if isinstance(output, str):
        return ToolResult(content=output)
    if isinstance(output, BaseModel):
        return ToolResult(content=output.model_dump_json(), structured=output.model_dump(mode="json"))
    try:
        text = json.dumps(output, default=str)
    except (TypeError, ValueError):
        text = str(output)
    return ToolResult(content=text, structured=output if isinstance(output, dict) else None)


# --- @tool -------------------------------------------------------------------------------------

_SPHINX_FIELD = re.compile(r"^\s*:param\b", re.MULTILINE)


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The summary and per-argument descriptions from a Google- or Sphinx-style docstring (griffe)."""
    if not doc:
        return "", {}
    text = inspect.cleandoc(doc)
    style: Literal["google", "sphinx"] = "sphinx" if _SPHINX_FIELD.search(text) else "google"
    sections = Docstring(text, lineno=1).parse(style, warnings=False)
    summary = sections[0].value if sections and sections[0].kind is DocstringSectionKind.text else ""
    args = {
        param.name.lstrip("*"): " ".join(param.description.split())
        for section in sections
        if section.kind is DocstringSectionKind.parameters
        for param in section.value
    }
    return " ".join(summary.split()), args


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's auto-generated titles: they cost tokens and tell the model nothing."""
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        if isinstance(prop, dict):
            prop.pop("title", None)
    for definition in schema.get("$defs", {}).values():
        if isinstance(definition, dict):
            _clean_schema(definition)
    return schema


def _argument_hints(fn: Callable[..., Any], tool_name: str) -> dict[str, Any]:
    """Resolved argument annotations; the return annotation is not needed and may be unresolvable
    (a class local to a function, under ``from __future__ import annotations``)."""
    try:
        return get_type_hints(fn, include_extras=True)
    except Exception:
        pass
    hints: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        annotation = param.annotation
        if annotation is inspect.Parameter.empty:
            continue
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, getattr(fn, "__globals__", {}))
            except Exception as exc:
                raise ToolDefinitionError(
                    f"Cannot resolve the type hint {param.annotation!r} of argument {param.name!r} of tool "
                    f"{tool_name}: {exc}. Define the type at module level."
                ) from exc
        hints[param.name] = annotation
    return hints


def _from_function(
    fn: Callable[..., Any], name: str | None, description: str | None, idempotent: bool | None = None
) -> Tool:
    tool_name = name or fn.__name__
    summary, arg_docs = parse_docstring(fn.__doc__)
    hints = _argument_hints(fn, tool_name)
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDefinitionError(
                f"Tool {tool_name} takes *{param.name}: give every argument a name and a type instead."
            )
        if param.name not in hints:
            raise ToolDefinitionError(
                f"Argument {param.name!r} of tool {tool_name} has no type hint; add one so the model "
                "knows what to send."
            )
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints[param.name], Field(default, description=arg_docs.get(param.name)))
    args_model = create_model(f"{tool_name}_args", __config__=ConfigDict(extra="ignore"), **fields)
    parameters = _clean_schema(args_model.model_json_schema())
    parameters.setdefault("properties", {})

    if inspect.iscoroutinefunction(fn):

        async def handler(values: dict[str, Any]) -> Any:
            return await fn(**values)

    else:

        async def handler(values: dict[str, Any]) -> Any:
            # Sync tools may block (files, requests): keep them off the event loop, and let a
            # cancelled run return at once instead of waiting for the thread.
            return await anyio.to_thread.run_sync(partial(fn, **values), abandon_on_cancel=True)

    return Tool(
        tool_name, description or summary, parameters, handler, args_model=args_model, idempotent=idempotent
    )


@overload
def tool(
    fn: Callable[..., Any],
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    idempotent: bool | None = None,
) -> Tool: ...
@overload
def tool(
    *, name: str | None = None, description: str | None = None, idempotent: bool | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    idempotent: bool | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turn an async or sync function into a ``Tool``: ``@tool`` or ``@tool(name=..., description=...)``.

    Argument types come from the type hints, descriptions from the docstring's ``Args:`` section
    (or ``:param x:`` lines). The returned ``Tool`` is still directly awaitable through ``invoke``.
    ``idempotent=True`` lets a resumed run re-run a call of it that a restart interrupted.
    """
    if fn is not None:
        return _from_function(fn, name, description, idempotent)
    return lambda f: _from_function(f, name, description, idempotent)


class ToolRegistry:
    """The tools an agent may call, by unique name (a duplicate would make calls ambiguous)."""

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ToolRegistryError(
                f"A tool named {tool.name!r} is already registered; remove it first or give the new one "
                "another name (tool(fn, name=...))."
            )
        self._tools[tool.name] = tool
        return tool

    def remove(self, name: str) -> Tool:
        try:
            return self._tools.pop(name)
        except KeyError:
            raise ToolRegistryError(
                f"No tool named {name!r}; registered: {', '.join(self.names()) or 'none'}."
            ) from None

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __getitem__(self, name: str) -> Tool:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolRegistryError(
                f"No tool named {name!r}; registered: {', '.join(self.names()) or 'none'}."
            )
        return tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def tools(self) -> list[Tool]:
        return list(self._tools.values())

    def names(self) -> list[str]:
        return list(self._tools)

    def definitions(self) -> list[ToolDefinition]:
        return [t.definition() for t in self._tools.values()]

    async def call(self, call: ToolCall) -> ToolResult:
        """Run one model tool call; unknown names and unparseable arguments become error observations."""
        tool = self._tools.get(call.name)
        if tool is None:
            return ToolResult(
                call_id=call.id,
                name=call.name,
                is_error=True,
                content=f"There is no tool named {call.name!r}. Available tools: {', '.join(self.names()) or 'none'}.",
            )
        if call.raw_arguments is not None:
            return ToolResult(
                call_id=call.id,
                name=call.name,
                is_error=True,
                content=(
                    f"The arguments for {call.name} were not a JSON object: {call.raw_arguments!r}. "
                    f"Send a JSON object matching: {json.dumps(tool.parameters)}"
                ),
            )
        return await tool.invoke(call.arguments, call_id=call.id)
