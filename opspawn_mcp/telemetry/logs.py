"""Logs on stderr: text for people, or one JSON object per line for log pipelines.

Every line logged while a task runs names it (``task_context``). See docs/operations.md, "Logs".
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import trace

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("httpx", "httpx2", "mcp", "pika")
"""One line per request (two per task for the LLM alone), a dozen per RabbitMQ connection: noise,
and measurable CPU in a busy worker. Their warnings still show."""

current_task: ContextVar[str | None] = ContextVar("opspawn_task_id", default=None)
_json_lines = False


@contextmanager
def task_context(task_id: str) -> Iterator[None]:
    """Lines logged inside the block (and in tasks started from it) belong to ``task_id``."""
    token = current_task.set(task_id)
    try:
        yield
    finally:
        current_task.reset(token)


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` plus ``task_id``, ``trace_id``/``span_id`` and
    ``exception`` when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = current_task.get()
        if task_id is not None:
            entry["task_id"] = task_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = trace.format_trace_id(span.trace_id)
            entry["span_id"] = trace.format_span_id(span.span_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: LogFormat) -> None:
    """INFO and up to stderr in ``log_format``, minus the chatter of ``NOISY``."""
    global _json_lines
    _json_lines = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.captureWarnings(True)  # a warning is a log line too, in the same format
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def announce(text: str, *, level: int = logging.INFO) -> None:
    """A line for whoever started the process (serving at, ready, shutting down, cannot start):
    as it is on stderr, or a JSON log line in JSON mode, so a log pipeline reads only JSON."""
    if _json_lines:
        logging.getLogger("opspawn").log(level, text)
    else:
        print(text, file=sys.stderr, flush=True)
