"""The gRPC ``opspawn.v1.TaskService``: each method is one ``TaskService`` call.

Requests become the same dicts a REST or MCP client sends and the service validates them;
typed errors become gRPC statuses through ``OpspawnError.grpc_code``, so this module
decides nothing about what is valid or which code an error gets.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from opspawn_mcp.errors import Door, OpspawnError, RateLimited, Unauthenticated
from opspawn_mcp.grpc_internal import convert
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.grpc_internal.gen import tasks_pb2_grpc as pb_grpc
from opspawn_mcp.principals import Principal, Principals
from opspawn_mcp.service import TaskService

UNAUTHENTICATED_MESSAGE = "Send a token of this server as 'authorization: Bearer <token>' metadata."


def metadata_value(metadata: Any, name: str) -> str | None:
    """The call's ``name`` metadata value (a lower-case key), if any."""
    for key, value in metadata or ():
        if key.lower() == name and isinstance(value, str):
            return value
    return None


def authorization_of(metadata: Any) -> str | None:
    """The call's ``authorization`` metadata value, if any."""
    return metadata_value(metadata, "authorization")


IDEMPOTENCY_METADATA = "idempotency-key"
log = logging.getLogger(__name__)
T = TypeVar("T")


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """End the call with the error's status; an unexpected exception is a bug: logged with its
    trace here, reported as a bare INTERNAL there (no trace crosses the wire). A rate limit
    also says when to retry, as ``retry-after`` trailing metadata (seconds)."""
    if isinstance(exc, RateLimited):
        context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
    if isinstance(exc, OpspawnError):
        await context.abort(grpc.StatusCode[exc.grpc_code], exc.message_for(Door.GRPC))
    log.error("unhandled error in a gRPC call", exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, "The server failed to handle this call; it has been logged."
    )


async def answer(
    context: grpc.aio.ServicerContext[Any, Any],
    principals: Principals,
    call: Callable[[Principal], Awaitable[T]],
) -> T:
    """Run one unary call as its caller; any error (conversion included) ends the call through
    ``abort_with``."""
    try:
        return await call(caller_of(context, principals))
    except Exception as exc:
        await abort_with(context, exc)
        raise


def caller_of(context: grpc.aio.ServicerContext[Any, Any], principals: Principals) -> Principal:
    """The principal the call's ``authorization`` metadata names (the interceptor has already
    refused calls without a valid token, so None here is a wiring bug)."""
    principal = principals.authenticate(authorization_of(context.invocation_metadata()))
    if principal is None:
        raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
    return principal


class TaskServicer(pb_grpc.TaskServiceServicer):
    def __init__(self, service: TaskService, principals: Principals) -> None:
        self._service = service
        self._principals = principals

    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Task:
        # A repeated submit with the same key answers the first task (opspawn_mcp.idempotency).
        key = metadata_value(context.invocation_metadata(), IDEMPOTENCY_METADATA)
        task = await answer(
            context,
            self._principals,
            lambda by: self._service.submit(convert.spec_from_pb(request.spec), by=by, idempotency_key=key),
        )
        return convert.task_to_pb(task)

    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Task:
        task = await answer(context, self._principals, lambda by: self._service.get(request.task_id, by=by))
        return convert.task_to_pb(task)

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTasksResponse:
        kwargs: dict[str, Any] = {}
        if request.HasField("limit"):
            kwargs["limit"] = request.limit
        if request.HasField("cursor"):
            kwargs["cursor"] = request.cursor

        async def page(by: Principal) -> pb.ListTasksResponse:
            listed = await self._service.list_tasks(convert.status_from_pb(request.status), **kwargs, by=by)
            return convert.page_to_pb(listed)

        return await answer(context, self._principals, page)

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Task:
        task = await answer(
            context, self._principals, lambda by: self._service.cancel(request.task_id, by=by)
        )
        return convert.task_to_pb(task)

    async def AnswerTask(
        self, request: pb.AnswerTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Task:
        reply = convert.answer_from_pb(request)
        task = await answer(
            context,
            self._principals,
            lambda by: self._service.answer(request.task_id, request.request_id, reply, by=by),
        )
        return convert.task_to_pb(task)

    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.TaskEvent]:
        """Events after ``after_seq``, live until the task ends. A client that goes away cancels
        this generator, and closing the service's watch stops its polling."""
        try:
            stream = self._service.watch(
                request.task_id, request.after_seq, by=caller_of(context, self._principals)
            )
        except Exception as exc:
            await abort_with(context, exc)
            raise
        try:
            async for event in stream:
                yield convert.event_to_pb(event)
        except Exception as exc:
            await abort_with(context, exc)
            raise
        finally:
            await stream.aclose()
