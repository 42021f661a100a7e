"""OpenTelemetry traces: one trace follows a task from its door to its last downstream call.

Off (and the SDK never imported) unless an OTLP endpoint is configured.
See docs/operations.md, "Traces".
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer

from opspawn_mcp.config import TelemetrySettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACER_NAME = "opspawn"
TASK_ID = "opspawn.task.id"
"""The attribute every task span carries: one query finds every trace of a task."""
TRACES_PATH = "/v1/traces"

_tracer: Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def install(provider: TracerProvider) -> None:
    """Trace from now on into the global provider, which ``provider`` becomes unless one was set
    already (by an application embedding opspawn, say: then all spans go where its own go, the
    MCP SDK's too). ``traced`` calls it; tests pass a provider with an in-memory exporter."""
    global _tracer
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer(TRACER_NAME)


def uninstall() -> None:
    """Stop opspawn's spans (the provider stays global; its owner shuts it down)."""
    global _tracer
    _tracer = None


def otlp_traces_url(settings: TelemetrySettings, environ: Mapping[str, str] | None = None) -> str | None:
    """Where spans go, or None (tracing off): the config's base URL, else the OTel variables."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.otlp_endpoint:
        return settings.otlp_endpoint.rstrip("/") + TRACES_PATH
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + TRACES_PATH if base else None


@contextmanager
def traced(settings: TelemetrySettings, environ: Mapping[str, str] | None = None) -> Iterator[bool]:
    """Export this process's spans over OTLP/HTTP inside the block, if an endpoint is configured;
    on leaving, the spans still buffered are flushed. Yields whether tracing is on."""
    url = otlp_traces_url(settings, environ)
    if url is None:
        yield False
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    install(provider)
    try:
        yield True
    finally:
        uninstall()
        provider.shutdown()


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    context: Context | None = None,
) -> AbstractContextManager[Span | None]:
    """A span current inside the block (None when tracing is off); an exception leaving the
    block is recorded on it and sets its status to error."""
    if _tracer is None:
        return nullcontext()
    return _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes)


def outgoing() -> dict[str, str] | None:
    """The current trace context as W3C ``traceparent``/``tracestate`` entries, to travel with a
    message; None when tracing is off or there is no current span."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def incoming(carrier: Mapping[str, str] | None) -> Context | None:
    """The context a message or request carried, to parent the span that handles it."""
    return propagate.extract(carrier) if carrier and _tracer is not None else None


def _messaging(operation: str, system: str, queue: str, task_id: str) -> dict[str, str]:
    return {
        "messaging.system": system,
        "messaging.destination.name": queue,
        "messaging.operation.type": operation,
        TASK_ID: task_id,
    }


def publishing(system: str, queue: str, task_id: str) -> AbstractContextManager[Span | None]:
    """The producer span of one task message; the message carries its context (``outgoing``)."""
    if _tracer is None:
        return nullcontext()
    return span(
        f"send {queue}", kind=SpanKind.PRODUCER, attributes=_messaging("send", system, queue, task_id)
    )


def processing(
    carrier: Mapping[str, str] | None, system: str, queue: str, task_id: str
) -> AbstractContextManager[Span | None]:
    """The consumer span of one task message, a child of the producer span it carried."""
    if _tracer is None:
        return nullcontext()
    return span(
        f"process {queue}",
        kind=SpanKind.CONSUMER,
        context=incoming(carrier),
        attributes=_messaging("process", system, queue, task_id),
    )
