"""The gRPC door's interceptors: the bearer-token check and the server span, on one base.

``MethodInterceptor`` is the part they share: leave unknown methods and one method-name prefix
(the health service) alone, wrap every other handler. docs/grpc.md and docs/operations.md say
what each enforces or records.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from opspawn_mcp.grpc_internal.task_servicer import UNAUTHENTICATED_MESSAGE, authorization_of
from opspawn_mcp.principals import Principals
from opspawn_mcp.telemetry import tracing

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class MethodInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each method's handler (``wrap``), but not those whose name starts with ``skip``."""

    def __init__(self, skip: str) -> None:
        self._skip = skip

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._skip):
            return handler
        return self.wrap(handler, details)

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError


def codecs_of(handler: grpc.RpcMethodHandler) -> dict[str, Any]:
    """The (de)serialisers a replacement handler must keep."""
    return {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }


class BearerInterceptor(MethodInterceptor):
    """Refuses calls without a valid token before they reach a servicer (health stays open)."""

    def __init__(self, principals: Principals) -> None:
        super().__init__(HEALTH_PREFIX)
        self._principals = principals

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if self._principals.authenticate(authorization_of(details.invocation_metadata)) is not None:
            return handler
        return _denying(handler)


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with UNAUTHENTICATED."""
    codecs = codecs_of(handler)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **codecs)
    return grpc.stream_stream_rpc_method_handler(_deny, **codecs)


class TracedGrpc(MethodInterceptor):
    """The gRPC door's server span: one per call, whose parent is the caller's W3C
    ``traceparent`` metadata when it sends one; ``serve_grpc`` adds it only while tracing is on."""

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        carrier = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        def span() -> Any:
            context = tracing.incoming(carrier)
            return tracing.span(
                method.lstrip("/"), kind=SpanKind.SERVER, context=context, attributes=attributes
            )

        codecs = codecs_of(handler)
        if handler.unary_unary:
            unary = handler.unary_unary

            async def traced_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                with span():
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(traced_unary, **codecs)
        if handler.unary_stream:
            stream = handler.unary_stream

            async def traced_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                with span():
                    async for reply in stream(request, context):
                        yield reply

            return grpc.unary_stream_rpc_method_handler(traced_stream, **codecs)
        return handler  # the API has no client-streaming method
