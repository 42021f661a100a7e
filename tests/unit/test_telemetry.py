"""The telemetry settings and parts that need no services: where spans go, the JSON log lines,
and the Dramatiq middleware that carries the trace context in a message."""

from __future__ import annotations

import io
import json
import logging

import dramatiq
import pytest
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from opspawn_mcp.broker import task_message
from opspawn_mcp.config import TelemetrySettings, describe, parse_config
from opspawn_mcp.errors import ConfigError
from opspawn_mcp.telemetry import tracing
from opspawn_mcp.telemetry.logs import JsonFormatter, task_context
from opspawn_mcp.telemetry.messages import TRACE_OPTION, TraceContext
from tests.support.traces import one, parent_of, recording, span_id, trace_id

BASE = "http://collector:4318"


@pytest.mark.parametrize(
    ("configured", "environ", "url"),
    [
        (None, {}, None),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": BASE + "/"}, BASE + "/v1/traces"),
        (
            None,
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x", "OTEL_EXPORTER_OTLP_ENDPOINT": BASE},
            "http://t:1/x",
        ),
        ("http://cfg:4318", {"OTEL_EXPORTER_OTLP_ENDPOINT": BASE}, "http://cfg:4318/v1/traces"),
        ("http://cfg:4318", {"OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_spans_go_to_the_configured_endpoint_else_the_standard_variables(
    configured: str | None, environ: dict[str, str], url: str | None
) -> None:
    assert tracing.otlp_traces_url(TelemetrySettings(otlp_endpoint=configured), environ) == url


def test_without_an_endpoint_tracing_stays_off() -> None:
    with tracing.traced(TelemetrySettings(), environ={}) as on:
        assert on is False and not tracing.enabled()
        assert tracing.outgoing() is None
        with tracing.span("nothing") as span:
            assert span is None


def test_bad_telemetry_settings_name_their_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"opspawn": {"telemetry": {"log_format": "xml", "otlp_endpoint": "collector:4318"}}}, environ={}
        )
    text = str(caught.value)
    assert "opspawn.telemetry.log_format" in text and "opspawn.telemetry.otlp_endpoint" in text


def test_config_check_says_where_traces_go_and_how_logs_look() -> None:
    off = describe(parse_config({}, environ={}))[-1]
    on = describe(
        parse_config({"opspawn": {"telemetry": {"otlp_endpoint": BASE, "log_format": "json"}}}, environ={})
    )
    assert off.startswith("traces: off unless OTEL_EXPORTER_OTLP_ENDPOINT is set") and "logs: text" in off
    assert on[-1].startswith(f"traces: to {BASE}/v1/traces; logs: json")


def _log_through_json(logger_name: str, *messages: str, task: str | None = None) -> list[dict[str, str]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if task is None:
            for message in messages:
                logger.warning(message)
        else:
            with task_context(task):
                for message in messages:
                    logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_task_id_only_while_the_task_runs() -> None:
    (inside,) = _log_through_json("opspawn.test.json", "working", task="t-1")
    (outside,) = _log_through_json("opspawn.test.json", "idle")
    assert inside["task_id"] == "t-1" and inside["message"] == "working" and inside["level"] == "WARNING"
    assert "task_id" not in outside and outside["logger"] == "opspawn.test.json"


def test_json_lines_carry_the_current_span_when_tracing() -> None:
    with recording(), tracing.span("step") as span:
        assert span is not None
        (entry,) = _log_through_json("opspawn.test.span", "traced")
        context = span.get_span_context()
    assert entry["trace_id"] == format_trace_id(context.trace_id)
    assert entry["span_id"] == format_span_id(context.span_id)


def test_a_message_carries_nothing_while_tracing_is_off() -> None:
    message = task_message("q", "task-1")
    TraceContext().before_enqueue(None, message, None)
    assert message.options == {}


def test_the_middleware_carries_the_producer_span_to_the_consumer_span() -> None:
    middleware = TraceContext()
    with recording() as exporter:
        with tracing.publishing("rabbitmq", "q", "task-1"):
            message = task_message("q", "task-1")
            middleware.before_enqueue(None, message, None)
        # What the worker gets: the message as RabbitMQ delivers it, decoded from its bytes.
        delivered = dramatiq.Message.decode(message.encode())
        middleware.before_process_message(None, delivered)
        with tracing.span("run task"):
            pass
        middleware.after_process_message(None, delivered, result=None)
        spans = list(exporter.get_finished_spans())
    send, process, run = one(spans, "send q"), one(spans, "process q"), one(spans, "run task")
    assert TRACE_OPTION in delivered.options and process.kind is SpanKind.CONSUMER
    assert {trace_id(send), trace_id(process), trace_id(run)} == {trace_id(send)}
    assert (parent_of(process), parent_of(run)) == (span_id(send), span_id(process))
