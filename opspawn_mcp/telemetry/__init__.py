"""Observability: traces (``tracing``), the trace context in queue messages (``messages``), metrics
(``metrics``), logs (``logs``) and the hooks on model and downstream calls (``calls``).

What each produces, and how to turn it on: docs/operations.md.
"""
