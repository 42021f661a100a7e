"""The Tasks extension (SEP-2663) on the SDK's extension API, over any ``TaskBackend``.

It makes a declared ``tools/call`` a task and serves ``tasks/get``, ``tasks/update`` and
``tasks/cancel``. See docs/mcp-server.md, "Two protocol eras, and MCP Tasks".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mcp.server.context import CallNext, HandlerResult
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp_types import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    CallToolRequestParams,
    ClientCapabilities,
    MissingRequiredClientCapabilityErrorData,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from opspawn_mcp.mcp_tasks.backend import RequestContext, TaskBackend, UnknownTask
from opspawn_mcp.mcp_tasks.wire import (
    TASKS_EXTENSION,
    CreateTaskResult,
    DetailedTask,
    Task,
    TaskIdParams,
    UpdateTaskParams,
)


def declares_tasks(ctx: RequestContext) -> bool:
    """True when this request may receive a task: a 2026-07-28 request whose client
    capabilities (its ``_meta`` envelope) name the extension."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and TASKS_EXTENSION in capabilities.extensions)


def missing_tasks(ctx: RequestContext) -> MCPError:
    """-32021 naming the extension, for a request that needs a task but did not declare it."""
    data = MissingRequiredClientCapabilityErrorData(
        required_capabilities=ClientCapabilities(extensions={TASKS_EXTENSION: {}})
    )
    return MCPError(
        code=MISSING_REQUIRED_CLIENT_CAPABILITY,
        message=f"{ctx.method} needs the {TASKS_EXTENSION} extension: declare it in the request's "
        "_meta clientCapabilities.extensions (protocol 2026-07-28).",
        data=data.model_dump(by_alias=True, mode="json", exclude_none=True),
    )


def check_task_header(ctx: RequestContext, task_id: str) -> None:
    """Over streamable HTTP at 2026-07-28, ``Mcp-Name`` must be present and equal ``taskId``
    (SEP-2663 routing headers): a router that sent the request here by that header must have
    routed the task the body names."""
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is None or ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return
    named = decode_header_value(headers.get(MCP_NAME_HEADER))
    if named != task_id:
        shown = "missing" if named is None else repr(named)
        raise MCPError(
            code=HEADER_MISMATCH,
            message=f"Mcp-Name header ({shown}) must equal params.taskId ({task_id!r}) on {ctx.method}",
        )


def _unknown(exc: UnknownTask) -> MCPError:
    return MCPError(code=INVALID_PARAMS, message=str(exc), data={"taskId": exc.task_id})


TaskHandler = Callable[[RequestContext, Any], Awaitable[HandlerResult]]


class TasksExtension(Extension):
    """Serve ``backend``'s tasks over MCP; mount with ``MCPServer(extensions=[TasksExtension(b)])``."""

    identifier = TASKS_EXTENSION

    def __init__(self, backend: TaskBackend) -> None:
        self.backend = backend

    def methods(self) -> Sequence[MethodBinding]:
        return (
            MethodBinding("tasks/get", TaskIdParams, self._guarded(self._get)),
            MethodBinding("tasks/update", UpdateTaskParams, self._guarded(self._update)),
            MethodBinding("tasks/cancel", TaskIdParams, self._guarded(self._cancel)),
        )

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: RequestContext, call_next: CallNext
    ) -> HandlerResult:
        support = self.backend.support(params.name)
        if support is None:
            return await call_next(ctx)
        if not declares_tasks(ctx):
            if support == "required":
                raise missing_tasks(ctx)
            return await call_next(ctx)
        answer = await self.backend.create(params, ctx)
        if isinstance(answer, DetailedTask):
            return CreateTaskResult.model_validate(answer.model_dump(include=set(Task.model_fields))).wire()
        return answer

    def _guarded(self, handler: Callable[[RequestContext, Any], Awaitable[HandlerResult]]) -> TaskHandler:
        """The checks every ``tasks/*`` method makes first: the extension declared (-32021),
        ``Mcp-Name`` matching (-32020); then an unknown task id is -32602."""

        async def guarded(ctx: RequestContext, params: Any) -> HandlerResult:
            if not declares_tasks(ctx):
                raise missing_tasks(ctx)
            check_task_header(ctx, params.task_id)
            try:
                return await handler(ctx, params)
            except UnknownTask as exc:
                raise _unknown(exc) from None

        return guarded

    async def _get(self, ctx: RequestContext, params: TaskIdParams) -> HandlerResult:
        return (await self.backend.get(params.task_id, ctx)).wire()

    async def _update(self, ctx: RequestContext, params: UpdateTaskParams) -> HandlerResult:
        await self.backend.update(params.task_id, params.input_responses, ctx)
        return {}

    async def _cancel(self, ctx: RequestContext, params: TaskIdParams) -> HandlerResult:
        await self.backend.cancel(params.task_id, ctx)
        return {}
