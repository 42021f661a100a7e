"""The exceptions agentkit raises.

Failures of tools and models during a run are turned into data (observations, a failed
``RunResult``); these types are for the cases where the caller has to change something:
a misconfigured registry, a model that cannot be reached, a tool that wants to tell the model
what went wrong.
"""

from __future__ import annotations

from pydantic import ValidationError


class AgentKitError(Exception):
    """Base class, so a host can catch everything agentkit raises in one clause."""


class ToolError(AgentKitError):
    """Raise inside a tool to hand the model an error observation it can correct from.

    The message is shown to the model verbatim, so write it as an instruction: what was wrong
    and what to send instead.
    """


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
