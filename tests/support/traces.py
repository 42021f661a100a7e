"""Recording this process's spans with the SDK's in-memory exporter, and reading them back.

The OpenTelemetry API takes one global tracer provider per process, once; the MCP SDK's spans
go to it. So the first test that records installs one provider for the whole session, and each
``recording()`` block clears its exporter and turns opspawn's own spans on for the block only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from opspawn_mcp.telemetry import tracing

_exporter = InMemorySpanExporter()
_provider: TracerProvider | None = None


@contextmanager
def recording() -> Iterator[InMemorySpanExporter]:
    """Trace inside the block; the exporter holds the block's finished spans."""
    global _provider
    if _provider is None:
        _provider = TracerProvider()
        _provider.add_span_processor(SimpleSpanProcessor(_exporter))
    tracing.install(_provider)
    _exporter.clear()
    try:
        yield _exporter
    finally:
        tracing.uninstall()
        _exporter.clear()


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, f"{len(found)} spans named {name!r} in {sorted({s.name for s in spans})}"
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id
