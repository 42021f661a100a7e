"""The host pool's pure parts: backoff, secret handling, access checks made before any I/O."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import get_args

import pytest

from opspawn_mcp.config import HttpServerConfig, StdioServerConfig
from opspawn_mcp.errors import Forbidden, NotFound, Unavailable
from opspawn_mcp.host import OpsMcpClient, ServerInfo, ServerState
from opspawn_mcp.host.connection import BACKOFF_BASE_S, BACKOFF_MAX_S, ServerConnection, backoff_delay
from opspawn_mcp.host.tasks import DEFAULT_POLL_S, MAX_POLL_S, MIN_POLL_S, poll_interval_s
from opspawn_mcp.host.transports import Secrets
from opspawn_mcp.mcp_tasks import CreateTaskResult
from tests.support.callers import call_fails

# A command that cannot run: any attempt to connect would fail loudly, so a refusal proves no I/O.
NEVER = StdioServerConfig(command="/nonexistent/never-started")


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for failures in range(1, 20):
        step = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (failures - 1))
        delay = backoff_delay(failures, rng)
        assert 0.5 * step <= delay <= 1.5 * step
    assert len({backoff_delay(3, rng) for _ in range(20)}) > 1


def test_secrets_expand_from_the_environment_and_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSPAWN_UNIT_SECRET", "hunter2-long")
    secrets = Secrets()
    assert secrets.expand("s", "Bearer ${OPSPAWN_UNIT_SECRET}") == "Bearer hunter2-long"
    assert secrets.redact("401 for token hunter2-long") == "401 for token ***"
    assert secrets.expand("s", "no refs") == "no refs"


def test_an_unset_variable_names_itself_and_the_server() -> None:
    with pytest.raises(Unavailable) as caught:
        Secrets().expand("github", "${OPSPAWN_UNIT_SURELY_UNSET}")
    assert "OPSPAWN_UNIT_SURELY_UNSET" in caught.value.message and "'github'" in caught.value.message


async def test_scoped_refusals_happen_before_any_io() -> None:
    pool = OpsMcpClient({"allowed": NEVER, "other": NEVER})
    task = pool.scoped({"allowed"})
    assert task.allowed == frozenset({"allowed"})
    with call_fails(Forbidden) as forbidden:
        await task.call_tool("other", "t", {})
    assert forbidden.value.status == 403 and forbidden.value.details["server"] == "other"
    assert (
        forbidden.error.message
        == "This task may not use the MCP server 'other'. Servers it may use: allowed."
    )
    with pytest.raises(Forbidden):
        await task.list_tools("unknown")
    with call_fails(NotFound) as missing:
        await pool.call_tool("unknown", "t", {})
    assert "allowed, other" in missing.value.message
    # Not entered: a permitted server is refused with advice, not by trying to connect.
    with call_fails(Unavailable) as closed:
        await task.call_tool("allowed", "t", {})
    assert "async with OpsMcpClient" in closed.value.message


def test_servers_info_is_pure_data() -> None:
    pool = OpsMcpClient(
        {
            "local": NEVER,
            "remote": HttpServerConfig(url="https://example.invalid/mcp", headers={"X": "${TOKEN}"}),
            "legacy": HttpServerConfig(url="https://example.invalid/sse", transport="sse"),
        }
    )
    infos = {info.name: info for info in pool.servers_info()}
    assert infos["local"] == ServerInfo(name="local", transport="stdio", state="idle")
    assert infos["remote"].transport == "streamable-http" and infos["legacy"].transport == "sse"
    dumped = infos["remote"].model_dump()
    assert set(dumped) == {
        "name",
        "transport",
        "state",
        "tools",
        "tool_count",
        "hidden",
        "unmatched",
        "last_error",
        "calls",
        "errors",
        "opspawn_instance",
        "recent_calls",
    }
    assert [i.name for i in pool.scoped(["legacy"]).servers_info()] == ["legacy"]


def test_pool_and_scoped_view_are_agentkit_mcp_callers() -> None:
    from agentkit.mcp_proxy import McpCaller, mcp_proxy_tool

    pool = OpsMcpClient({"local": NEVER})
    callers: list[McpCaller] = [pool, pool.scoped(None)]
    for caller in callers:
        assert mcp_proxy_tool(caller) is not None


def test_server_config_defaults_for_health_retry_and_concurrency() -> None:
    config = StdioServerConfig(command="x")
    assert (config.max_timeouts, config.retry, config.max_concurrency) == (2, "if_idempotent", None)
    assert "unhealthy" in get_args(ServerState)
    with pytest.raises(ValueError):
        StdioServerConfig(command="x", retry="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HttpServerConfig(url="http://h/mcp", max_timeouts=0)


def test_unset_max_concurrency_follows_the_pool_default() -> None:
    """A worker passes its concurrency, so a 1,000-slot worker is not capped at 16 per server."""
    assert ServerConnection("s", NEVER).concurrency == 16
    assert ServerConnection("s", NEVER, default_concurrency=1000).concurrency == 1000
    pinned = StdioServerConfig(command="x", max_concurrency=3)
    assert ServerConnection("s", pinned, default_concurrency=1000).concurrency == 3
    with pytest.raises(ValueError):
        OpsMcpClient({}, default_concurrency=0)


def test_a_cold_pool_knows_no_annotations_so_only_always_reruns() -> None:
    pool = OpsMcpClient(
        {
            "default": NEVER,
            "always": NEVER.model_copy(update={"retry": "always"}),
            "never": NEVER.model_copy(update={"retry": "never"}),
        }
    )
    assert pool.idempotent("default", "anything") is None
    assert [pool.may_rerun(name, "anything") for name in ("default", "always", "never")] == [
        False,
        True,
        False,
    ]
    with pytest.raises(NotFound):
        pool.may_rerun("unknown", "t")
    scoped = pool.scoped({"always"})
    assert scoped.may_rerun("always", "t") is True
    with pytest.raises(Forbidden):
        scoped.idempotent("default", "t")
    with pytest.raises(NotFound):
        pool.scoped(None).may_rerun("unknown", "t")
    pool.check_server("default")
    with pytest.raises(NotFound):
        pool.check_server("unknown")


def test_downstream_tasks_are_polled_at_the_servers_interval_within_bounds() -> None:
    def created(poll_ms: int | None) -> CreateTaskResult:
        now = datetime.now(UTC)
        return CreateTaskResult(
            task_id="t",
            status="working",
            created_at=now,
            last_updated_at=now,
            ttl_ms=None,
            poll_interval_ms=poll_ms,
        )

    assert poll_interval_s(created(200)) == 0.2
    assert poll_interval_s(created(None)) == DEFAULT_POLL_S
    assert poll_interval_s(created(0)) == MIN_POLL_S  # a server cannot make the pool spin
    assert poll_interval_s(created(3_600_000)) == MAX_POLL_S  # nor make it miss the end for an hour
