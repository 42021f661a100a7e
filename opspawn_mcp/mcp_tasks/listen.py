"""``notifications/tasks`` over ``subscriptions/listen`` (SEP-2663 on SEP-2575).

A ``taskIds`` listen streams each followed task's changes, read at its ``pollIntervalMs``.
See docs/mcp-server.md, "Two protocol eras, and MCP Tasks".
"""

from __future__ import annotations

from typing import Any, cast

import anyio
from mcp.server.context import HandlerResult
from mcp.server.lowlevel.server import HandlerEntry
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    ServerNotification,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsAcknowledgedNotificationParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
)

from opspawn_mcp.mcp_tasks.backend import RequestContext, TaskBackend, UnknownTask
from opspawn_mcp.mcp_tasks.extension import declares_tasks, missing_tasks
from opspawn_mcp.mcp_tasks.wire import DetailedTask, TaskStatusNotification

LISTEN = "subscriptions/listen"
MAX_TASKS = 100
DEFAULT_POLL_S = 1.0


def _change(task: DetailedTask) -> tuple[Any, ...]:
    return (task.status, task.last_updated_at, tuple(sorted(task.input_requests or ())))


class TaskListen:
    """The ``subscriptions/listen`` handler: task streams here, anything else to ``fallback``."""

    def __init__(self, backend: TaskBackend, fallback: HandlerEntry[Any] | None) -> None:
        self._backend = backend
        self._fallback = fallback

    async def __call__(self, ctx: RequestContext, params: SubscriptionsListenRequestParams) -> HandlerResult:
        wanted = (params.notifications.model_extra or {}).get("taskIds")
        if wanted is None:
            if self._fallback is None:
                raise MCPError(INVALID_PARAMS, "This server streams only task notifications: name taskIds.")
            return await self._fallback.handler(ctx, params)
        if not declares_tasks(ctx):
            raise missing_tasks(ctx)
        if (
            not isinstance(wanted, list)
            or not all(isinstance(t, str) for t in wanted)
            or len(wanted) > MAX_TASKS
        ):
            raise MCPError(
                INVALID_PARAMS, f"notifications.taskIds must be a list of at most {MAX_TASKS} task ids."
            )
        if ctx.request_id is None:
            raise MCPError(INVALID_REQUEST, f"{LISTEN} requires a request id")
        known = [t for t in dict.fromkeys(wanted) if await self._known(t, ctx)]
        meta: dict[str, Any] = {SUBSCRIPTION_ID_META_KEY: ctx.request_id}
        honored = SubscriptionFilter.model_validate({"taskIds": known})
        ack = SubscriptionsAcknowledgedNotificationParams(notifications=honored, _meta=meta)
        await ctx.session.send_notification(
            SubscriptionsAcknowledgedNotification(params=ack), related_request_id=ctx.request_id
        )
        send, receive = anyio.create_memory_object_stream[DetailedTask](MAX_TASKS)
        async with anyio.create_task_group() as group:
            async with send:
                for task_id in known:
                    group.start_soon(self._follow, task_id, ctx, send.clone())
            async with receive:  # one writer: the frames go out in the order the followers saw them
                async for task in receive:
                    notification = TaskStatusNotification(params=task.wire() | {"_meta": meta})
                    # The SDK's notification union lists the core ones; its session sends any.
                    sent = cast("ServerNotification", notification)
                    await ctx.session.send_notification(sent, related_request_id=ctx.request_id)
        return SubscriptionsListenResult(_meta=meta)

    async def _known(self, task_id: str, ctx: RequestContext) -> bool:
        try:
            await self._backend.get(task_id, ctx)
        except UnknownTask:
            return False
        return True

    async def _follow(
        self, task_id: str, ctx: RequestContext, send: anyio.abc.ObjectSendStream[DetailedTask]
    ) -> None:
        last: tuple[Any, ...] | None = None
        async with send:
            while True:
                try:
                    task = await self._backend.get(task_id, ctx)
                except UnknownTask:
                    return  # expired meanwhile: nothing more will come
                if _change(task) != last:
                    last = _change(task)
                    await send.send(task)
                if task.terminal:
                    return
                await anyio.sleep((task.poll_interval_ms or DEFAULT_POLL_S * 1000) / 1000)


def serve_task_notifications(server: MCPServer[Any], backend: TaskBackend) -> None:
    """Put ``TaskListen`` in front of the server's ``subscriptions/listen`` (2026-07-28 only).

    ``MethodBinding`` cannot bind a spec method and MCPServer has no public hook for it, so this
    goes through the low-level server, which replaces the SDK's handler and keeps it as the
    fallback for listens without ``taskIds``.
    """
    lowlevel = server._lowlevel_server
    fallback = lowlevel.get_request_handler(LISTEN)
    handler = TaskListen(backend, fallback)
    lowlevel.add_request_handler(LISTEN, SubscriptionsListenRequestParams, handler)
