"""What the Tasks extension needs from whoever runs the tasks: five calls, no transport.

The extension owns the wire (negotiation, headers, result shapes, error codes); a backend owns
the tasks (where they run, where they are stored, who may see them). Each call gets the
request's context so a backend can name the caller; the extension never looks inside it.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from mcp.server.context import ServerRequestContext
from mcp_types import CallToolRequestParams, Result

from opspawn_mcp.mcp_tasks.wire import DetailedTask

TaskSupport = Literal["optional", "required"]
"""``optional``: a task when the client declared the extension, else the tool runs synchronously.
``required``: the tool cannot run without a task; undeclared clients get -32021."""

RequestContext = ServerRequestContext[Any, Any]


class UnknownTask(Exception):
    """No task with this id is visible to the caller (never created, expired, or someone else's)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"No task {task_id!r}: it does not exist, has expired, or is not yours.")
        self.task_id = task_id


class TaskBackend(Protocol):
    def support(self, tool: str) -> TaskSupport | None:
        """Whether ``tool`` runs as a task; ``None`` leaves its calls to the server untouched."""
        ...

    async def create(self, params: CallToolRequestParams, ctx: RequestContext) -> DetailedTask | Result:
        """Start a task for this call and return it once it is durable (``tasks/get`` finds it).

        A backend may answer at once instead (a refusal as an ``isError`` tool result, a fast
        result, or an ``InputRequiredResult`` to gather input before any task exists).
        """
        ...

    async def get(self, task_id: str, ctx: RequestContext) -> DetailedTask:
        """The task as the caller sees it now; raises ``UnknownTask``."""
        ...

    async def update(self, task_id: str, responses: dict[str, Any], ctx: RequestContext) -> None:
        """Deliver ``inputResponses``; keys that are not pending are ignored. Raises ``UnknownTask``."""
        ...

    async def cancel(self, task_id: str, ctx: RequestContext) -> None:
        """Ask the task to stop; a terminal task is left as it is. Raises ``UnknownTask``."""
        ...
