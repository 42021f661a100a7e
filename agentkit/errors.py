"""The exceptions agentkit raises, for what a caller has to change (failures during a run are data).

See docs/agentkit.md, "A complete example".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError


class AgentKitError(Exception):
    """Base class, so a host can catch everything agentkit raises in one clause."""


class ToolError(AgentKitError):
    """A tool call that failed: the one error value a tool, or an MCP caller, hands the model.

    ``message`` is the whole observation the model reads, verbatim and without a prefix, so write
    it as an instruction: what was wrong and what to send instead. ``parts`` keeps the content
    blocks of a failed MCP result (as MCP JSON) for the host's events. An ``McpCaller`` raises it
    for every way a call can fail (like pydantic-ai's ``ModelRetry`` from its MCP toolsets).
    """

    def __init__(self, message: str, *, parts: Iterable[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.parts = [dict(part) for part in parts]


class ToolRegistryError(AgentKitError, ValueError):
    """A registry operation that cannot succeed as asked (duplicate or unknown name)."""


class ToolDefinitionError(AgentKitError, TypeError):
    """A function cannot be turned into a tool (for example an argument without a type hint)."""


class AgentConfigError(AgentKitError, ValueError):
    """An ``Agent`` was built with settings that cannot work (unknown planner, bad limits)."""


def validation_problems(
    exc: ValidationError, *, root: str, prefix: str = "", unknown: str = "unknown field"
) -> list[str]:
    """Each failure of a pydantic validation as ``path: message``, the path written as in JSON.

    ``root`` names the whole value when the failure has no path; ``unknown`` is the message for
    a key the model forbids ("unknown field" in a request, "unknown key" in a config file).
    """
    out = []
    for err in exc.errors(include_url=False):
        parts: list[str] = [prefix] if prefix else []
        for item in err["loc"]:
            parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
        msg = unknown if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        out.append(f"{''.join(parts) or root}: {msg}")
    return out
