"""The exceptions agentkit raises.

Failures of tools and models during a run are turned into data (observations, a failed
``RunResult``); these types are for the cases where the caller has to change something:
a misconfigured registry, a model that cannot be reached, a tool that wants to tell the model
what went wrong.
"""

from __future__ import annotations


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
