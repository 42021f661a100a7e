"""Prometheus metrics, served at ``/metrics`` behind the HTTP guard (admins only).

Store gauges read at scrape time, and per-process counters. See docs/operations.md, "Metrics".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from opspawn_mcp.models import TaskStatus

CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TASK_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)

REGISTRY = CollectorRegistry()
"""This process's own metrics (not the client library's global registry, shared with whoever
imports opspawn)."""
ProcessCollector(registry=REGISTRY)

TASK_DURATION = Histogram(
    "opspawn_task_duration_seconds",
    "Time from submit to the final state, of tasks this process finished.",
    ["status"],
    buckets=TASK_BUCKETS,
    registry=REGISTRY,
)
LLM_CALLS = Counter(
    "opspawn_llm_calls",
    "Model calls by profile and outcome (ok, error).",
    ["profile", "outcome"],
    registry=REGISTRY,
)
LLM_CALL_DURATION = Histogram(
    "opspawn_llm_call_duration_seconds",
    "Latency of model calls by profile.",
    ["profile"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
LLM_TOKENS = Counter(
    "opspawn_llm_tokens",
    "Model tokens by profile and type (input, output).",
    ["profile", "type"],
    registry=REGISTRY,
)
DOWNSTREAM_CALLS = Counter(
    "opspawn_downstream_calls",
    "Downstream MCP tool calls by server and outcome (ok, tool_error, error).",
    ["server", "outcome"],
    registry=REGISTRY,
)
DOWNSTREAM_CALL_DURATION = Histogram(
    "opspawn_downstream_call_duration_seconds",
    "Latency of downstream MCP tool calls by server.",
    ["server"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)


class _StoreCounts(Collector):
    """The store's counts of one scrape, as gauges."""

    def __init__(self, counts: Mapping[TaskStatus, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        tasks = GaugeMetricFamily("opspawn_tasks", "Tasks in the store by state.", labels=["state"])
        for status, count in self._counts.items():
            tasks.add_metric([status.value], count)
        yield tasks
        yield GaugeMetricFamily(
            "opspawn_queue_depth",
            "Tasks queued and waiting for a worker.",
            value=self._counts.get(TaskStatus.QUEUED, 0),
        )


def exposition(counts: Mapping[TaskStatus, int]) -> bytes:
    """The text exposition of one scrape: the store's ``counts`` and this process's metrics."""
    scrape = CollectorRegistry()
    scrape.register(_StoreCounts(counts))
    return generate_latest(scrape) + generate_latest(REGISTRY)
