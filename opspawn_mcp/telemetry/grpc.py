"""The gRPC door's server span: one per call, whose parent is the caller's W3C ``traceparent``
metadata when it sends one. ``serve_grpc`` adds the interceptor only while tracing is on, and
leaves health checks out (probes would only be noise)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from opspawn_mcp.telemetry import tracing


class TracedGrpc(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, untraced: str) -> None:
        self._untraced = untraced
        """A method-name prefix (a service) that gets no span."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(self._untraced):
            return handler
        carrier = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        def span() -> Any:
            context = tracing.incoming(carrier)
            return tracing.span(
                method.lstrip("/"), kind=SpanKind.SERVER, context=context, attributes=attributes
            )

        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
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
