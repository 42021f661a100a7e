"""OpsMcpClient against the testing server over real stdio: sharing, faults, catalogue, shutdown."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import anyio
import mcp.types as types
import pytest

from agentkit import IDEMPOTENCY_META_KEY, ToolError
from opspawn_mcp.config import StdioServerConfig, example_server_config
from opspawn_mcp.errors import Forbidden, NotFound, Unavailable
from opspawn_mcp.host import OpsMcpClient, ServerInfo
from tests.servers.harness import is_alive, lines, started_pids, stdio_config, wait_until
from tests.support.callers import call_fails


def _text(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


def _info(pool: OpsMcpClient, name: str) -> ServerInfo:
    return next(info for info in pool.servers_info() if info.name == name)


def _most_in_flight(tmp_path: Path) -> int:
    """The most calls the testing server ran at once: it appends started/finished lines in the
    order it runs them."""
    running = peak = 0
    for line in lines(tmp_path / "cancels"):
        running += 1 if line.startswith("started") else -1
        peak = max(peak, running)
    return peak


async def test_concurrent_calls_on_a_cold_server_share_one_process(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        assert _info(pool, "t").state == "idle"
        pids: list[str] = []

        async def call() -> None:
            pids.append(_text(await pool.call_tool("t", "pid", {})))

        async with anyio.create_task_group() as tg:
            for _ in range(25):
                tg.start_soon(call)
        assert len(set(pids)) == 1
        assert started_pids(tmp_path) == [int(pids[0])]
        info = _info(pool, "t")
        assert info.state == "ready"
        assert info.calls == 25 and info.errors == 0
        assert {"echo", "sleep", "crash"} <= set(info.tools)
        assert info.tool_count == len(info.tools)
        assert info.transport == "stdio"


async def test_max_concurrency_bounds_calls_in_flight(tmp_path: Path) -> None:
    pool = OpsMcpClient({"t": stdio_config(tmp_path, max_concurrency=2)})
    async with pool, anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(pool.call_tool, "t", "sleep", {"seconds": 1.0, "tag": str(i)})
    assert _most_in_flight(tmp_path) == 2
    assert sum(line.startswith("finished") for line in lines(tmp_path / "cancels")) == 6


async def test_tool_errors_are_one_tool_error_with_the_text_the_model_reads(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        with pytest.raises(ToolError) as failed:
            await pool.call_tool("t", "fail", {"message": "nope"})
        assert failed.value.message == "The tool t/fail reported an error: nope"
        assert failed.value.parts == [{"type": "text", "text": "nope"}]
        with pytest.raises(ToolError) as unknown:
            await pool.call_tool("t", "no_such_tool", {})
        assert (
            unknown.value.message == "The tool t/no_such_tool reported an error: Unknown tool: no_such_tool"
        )
        ok = await pool.call_tool("t", "echo", {"text": "still fine"})
        assert not ok.is_error and _text(ok) == "still fine"
        info = _info(pool, "t")
        assert (info.calls, info.errors, info.state) == (3, 2, "ready")


async def test_crash_is_reported_then_the_next_call_reconnects(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        first = int(_text(await pool.call_tool("t", "pid", {})))
        with call_fails(Unavailable) as caught:
            await pool.call_tool("t", "crash", {})
        assert "'t'" in caught.value.message and "reconnect" in caught.value.message
        info = _info(pool, "t")
        assert info.state in ("idle", "connecting") and info.last_error
        await wait_until(lambda: not is_alive(first), "the crashed process is reaped")
        second = int(_text(await pool.call_tool("t", "pid", {})))
        assert second != first
        assert started_pids(tmp_path) == [first, second]
        assert _info(pool, "t").state == "ready"
        assert "crash" in _info(pool, "t").tools


async def test_server_exiting_while_idle_is_noticed(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        first = int(_text(await pool.call_tool("t", "pid", {})))
        # Kill it from outside, as an OOM killer would; no call is in flight.
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: _info(pool, "t").state != "ready", "the pool notices the exit")
        assert "exited" in (_info(pool, "t").last_error or "")
        second = int(_text(await pool.call_tool("t", "pid", {})))
        assert second != first


async def test_timeout_cancels_the_call_on_the_server(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path, timeout_s=1.0)}) as pool:
        pid = _text(await pool.call_tool("t", "pid", {}))
        with call_fails(Unavailable) as caught:
            await pool.call_tool("t", "sleep", {"seconds": 60, "tag": "slow"})
        assert "did not answer 'sleep' within 1s; the call was cancelled" in caught.value.message
        assert caught.value.details["timeouts_in_a_row"] == 1 and not caught.value.details["unhealthy"]
        await wait_until(lambda: "cancelled slow" in lines(tmp_path / "cancels"), "server saw the cancel")
        # The session survives a timeout: same process, still answering.
        assert _text(await pool.call_tool("t", "pid", {})) == pid
        assert _info(pool, "t").errors == 1


async def test_caller_cancellation_also_reaches_the_server(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        await pool.call_tool("t", "echo", {"text": "warm"})
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call_tool, "t", "sleep", {"seconds": 60, "tag": "abandoned"})
            await wait_until(lambda: "started abandoned" in lines(tmp_path / "cancels"), "call started")
            tg.cancel_scope.cancel()
        await wait_until(
            lambda: "cancelled abandoned" in lines(tmp_path / "cancels"), "server saw the cancel"
        )


async def test_progress_reaches_the_callback(tmp_path: Path) -> None:
    seen: list[tuple[float, float | None]] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        result = await pool.call_tool("t", "sleep", {"seconds": 0.3}, progress_callback=progress)
        assert not result.is_error
    assert seen and seen[-1][0] == seen[-1][1]


async def test_list_changed_refreshes_the_catalogue(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        before = {tool.name for tool in await pool.list_tools("t")}
        assert "fresh_tool" not in before
        await pool.call_tool("t", "add_tool", {"name": "fresh_tool"})
        await wait_until(lambda: "fresh_tool" in _info(pool, "t").tools, "catalogue refreshed")
        assert "fresh_tool" in {tool.name for tool in await pool.list_tools("t")}
        assert _text(await pool.call_tool("t", "fresh_tool", {"text": "hi"})) == "fresh_tool: hi"
        assert _info(pool, "t").tool_count == len(before) + 1


async def test_refused_servers_never_start_a_process(tmp_path: Path) -> None:
    servers = {"a": stdio_config(tmp_path), "b": stdio_config(tmp_path)}
    async with OpsMcpClient(servers) as pool:
        task = pool.scoped(["a"])
        with call_fails(Forbidden) as forbidden:
            await task.call_tool("b", "echo", {"text": "x"})
        assert "'b'" in forbidden.value.message and "a" in forbidden.value.message
        with pytest.raises(Forbidden):
            await task.list_tools("b")
        with call_fails(NotFound):
            await pool.call_tool("nope", "echo", {})
        with call_fails(NotFound):
            await pool.scoped(None).call_tool("nope", "echo", {})
        assert started_pids(tmp_path) == []
        assert [info.name for info in task.servers_info()] == ["a"]
        assert _text(await task.call_tool("a", "echo", {"text": "allowed"})) == "allowed"
        assert len(started_pids(tmp_path)) == 1


async def test_a_failing_server_becomes_unavailable_without_blocking_others(tmp_path: Path) -> None:
    broken = StdioServerConfig(command=sys.executable, args=["-c", "import sys; sys.exit(2)"], timeout_s=10)
    async with OpsMcpClient({"broken": broken, "t": stdio_config(tmp_path)}) as pool:
        errors: list[str] = []
        while _info(pool, "broken").state != "unavailable":
            with call_fails(Unavailable) as caught:
                await pool.call_tool("broken", "anything", {})
            errors.append(caught.value.message)
            assert len(errors) < 10
        assert len(errors) == 3
        info = _info(pool, "broken")
        assert info.last_error and "exited" in info.last_error
        with call_fails(Unavailable) as fast:
            await pool.call_tool("broken", "anything", {})
        assert "unavailable" in fast.value.message and "retried in" in fast.value.message
        assert _text(await pool.call_tool("t", "echo", {"text": "unaffected"})) == "unaffected"
        assert _info(pool, "broken").errors == 4


async def test_a_server_dying_on_every_call_backs_off_to_unavailable(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        crashes = 0
        while _info(pool, "t").state != "unavailable":
            with call_fails(Unavailable):
                await pool.call_tool("t", "crash", {})
            crashes += 1
            assert crashes <= 3
        assert len(started_pids(tmp_path)) == 3
        with call_fails(Unavailable) as fast:
            await pool.call_tool("t", "echo", {"text": "x"})
        assert "unavailable" in fast.value.message
        assert len(started_pids(tmp_path)) == 3


async def test_missing_command_is_a_clear_error(tmp_path: Path) -> None:
    missing = StdioServerConfig(command="/nonexistent/mcp-server")
    async with OpsMcpClient({"m": missing}) as pool:
        with pytest.raises(Unavailable) as caught:
            await pool.list_tools("m")
        assert "'m'" in caught.value.message and "nonexistent" in caught.value.message


async def test_unset_secret_variable_is_named(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, env={"TOKEN": "${OPSPAWN_TEST_UNSET_SECRET_VAR}"})
    async with OpsMcpClient({"t": config}) as pool:
        with call_fails(Unavailable) as caught:
            await pool.call_tool("t", "echo", {"text": "x"})
        assert "OPSPAWN_TEST_UNSET_SECRET_VAR" in caught.value.message
    assert started_pids(tmp_path) == []


async def test_secrets_reach_the_server_and_not_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cret-value-for-test"
    monkeypatch.setenv("OPSPAWN_TEST_SECRET", secret)
    config = stdio_config(tmp_path, env={"TOKEN": "${OPSPAWN_TEST_SECRET}"})
    async with OpsMcpClient({"t": config}) as pool:
        assert _text(await pool.call_tool("t", "env", {"name": "TOKEN"})) == secret
        with call_fails(Unavailable):
            await pool.call_tool("t", "crash", {"message": f"dying with {secret}"})
        assert secret not in repr(pool.servers_info())
    assert "${OPSPAWN_TEST_SECRET}" in config.env["TOKEN"]


async def test_stderr_goes_to_the_log_under_the_server_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opspawn_mcp.host.stderr")
    async with OpsMcpClient({"loud": stdio_config(tmp_path)}) as pool:
        await pool.call_tool("loud", "say_stderr", {"text": "marker-1234"})
        await wait_until(
            lambda: any("[loud] marker-1234" in r.getMessage() for r in caplog.records), "stderr line logged"
        )
        await pool.call_tool("loud", "log_message", {"text": "via-mcp-log"})
        await wait_until(
            lambda: any(
                "[loud] via-mcp-log" in r.getMessage() and r.levelno == logging.WARNING
                for r in caplog.records
            ),
            "MCP log message logged",
        )


async def test_a_server_dying_at_start_leaves_its_last_words_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="opspawn_mcp.host.stderr")
    code = "import sys; print('boom-at-start', file=sys.stderr); sys.exit(2)"
    async with OpsMcpClient({"dying": StdioServerConfig(command=sys.executable, args=["-c", code])}) as pool:
        with pytest.raises(Unavailable):
            await pool.list_tools("dying")
        await wait_until(
            lambda: any("[dying] boom-at-start" in r.getMessage() for r in caplog.records),
            "last words logged",
        )


async def test_shutdown_leaves_no_process_even_when_one_ignores_stdin(tmp_path: Path) -> None:
    servers = {
        "polite": stdio_config(tmp_path),
        "stubborn": stdio_config(tmp_path, "--ignore-stdin-close"),
    }
    outcome: list[BaseException] = []

    async def in_flight(pool: OpsMcpClient) -> None:
        try:
            await pool.call_tool("polite", "sleep", {"seconds": 60, "tag": "at-shutdown"})
        except ToolError as exc:
            outcome.append(exc.__cause__ or exc)

    async with anyio.create_task_group() as outer, OpsMcpClient(servers) as pool:
        for name in servers:
            await pool.call_tool(name, "echo", {"text": "hi"})
        pids = started_pids(tmp_path)
        assert len(pids) == 2 and all(is_alive(pid) for pid in pids)
        # A call in flight at shutdown must not keep the pool open.
        outer.start_soon(in_flight, pool)
        await wait_until(lambda: "started at-shutdown" in lines(tmp_path / "cancels"), "call started")
    assert not [pid for pid in pids if is_alive(pid)]
    assert len(outcome) == 1
    with call_fails(Unavailable):
        await pool.call_tool("polite", "echo", {"text": "after close"})
    assert all(info.state != "ready" for info in pool.servers_info())


async def test_a_frozen_server_is_marked_unhealthy_and_replaced(tmp_path: Path) -> None:
    """SIGSTOP keeps the pipes open, so only timeouts can reveal the freeze: after two in a row the
    pool kills the frozen process (it cannot handle SIGTERM) and starts a new one."""
    async with OpsMcpClient({"t": stdio_config(tmp_path, timeout_s=1.0)}) as pool:
        frozen = int(_text(await pool.call_tool("t", "pid", {})))
        os.kill(frozen, signal.SIGSTOP)
        try:
            with call_fails(Unavailable) as first:
                await pool.call_tool("t", "echo", {"text": "one"})
            assert "MCP server 't' did not answer 'echo' within 1s" in first.value.message
            assert "After 2 timeouts in a row" in first.value.message
            assert _info(pool, "t").state == "ready"
            with call_fails(Unavailable) as second:
                await pool.call_tool("t", "echo", {"text": "two"})
            assert "2 timeouts in a row" in second.value.message and "unhealthy" in second.value.message
            assert second.value.details["unhealthy"] is True
            info = _info(pool, "t")
            assert info.state == "unhealthy"
            assert info.last_error and "2 calls in a row did not answer within 1s" in info.last_error
            assert info.tools, "the catalogue survives the replacement"
            await wait_until(lambda: not is_alive(frozen), "the frozen process is killed and reaped")
        finally:
            if is_alive(frozen):
                os.kill(frozen, signal.SIGCONT)
        fresh = int(_text(await pool.call_tool("t", "pid", {})))
        assert fresh != frozen and started_pids(tmp_path) == [frozen, fresh]
        assert _info(pool, "t").state == "ready"
        assert _text(await pool.call_tool("t", "echo", {"text": "back"})) == "back"


async def test_an_answer_between_timeouts_resets_the_count(tmp_path: Path) -> None:
    """Slow calls on a healthy server are not a freeze: only timeouts in a row replace it."""
    config = stdio_config(tmp_path, timeout_s=1.0).model_copy(update={"max_timeouts": 2})
    async with OpsMcpClient({"t": config}) as pool:
        pid = _text(await pool.call_tool("t", "pid", {}))
        for tag in ("a", "b", "c"):
            with call_fails(Unavailable) as caught:
                await pool.call_tool("t", "sleep", {"seconds": 60, "tag": tag})
            assert caught.value.details["timeouts_in_a_row"] == 1
            assert _text(await pool.call_tool("t", "pid", {})) == pid
        assert _info(pool, "t").state == "ready" and started_pids(tmp_path) == [int(pid)]


async def test_meta_reaches_the_server_as_the_request_meta(tmp_path: Path) -> None:
    key = {IDEMPOTENCY_META_KEY: "task-1:2:0"}
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        seen = json.loads(_text(await pool.call_tool("t", "echo_meta", {}, meta={**key, "trace": "x"})))
        assert seen[IDEMPOTENCY_META_KEY] == "task-1:2:0" and seen["trace"] == "x"
        scoped = pool.scoped(["t"])
        ticks: list[float] = []

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            ticks.append(progress)

        # With a progress callback the SDK adds its progress token beside the caller's keys.
        seen = json.loads(
            _text(await scoped.call_tool("t", "echo_meta", {}, meta=key, progress_callback=progress))
        )
        assert seen[IDEMPOTENCY_META_KEY] == "task-1:2:0"
        # No key of ours without one; a trace context may be there when a tracer is installed.
        assert IDEMPOTENCY_META_KEY not in json.loads(_text(await pool.call_tool("t", "echo_meta", {})))


async def test_rerun_policy_follows_annotations_and_the_retry_setting(tmp_path: Path) -> None:
    base = stdio_config(tmp_path)
    servers = {
        "hints": base,
        "always": base.model_copy(update={"retry": "always"}),
        "never": base.model_copy(update={"retry": "never"}),
    }
    async with OpsMcpClient(servers) as pool:
        # Nothing listed yet: unknown, so only "always" re-runs.
        assert pool.idempotent("hints", "put_value") is None
        assert [pool.may_rerun(name, "put_value") for name in servers] == [False, True, False]
        await pool.open_all()
        expected = {"echo_meta": True, "put_value": True, "charge": False, "echo": None, "missing": None}
        assert {tool: pool.idempotent("hints", tool) for tool in expected} == expected
        assert {tool: pool.may_rerun("hints", tool) for tool in expected} == {
            "echo_meta": True,
            "put_value": True,
            "charge": False,
            "echo": False,
            "missing": False,
        }
        assert all(pool.may_rerun("always", tool) for tool in expected)
        assert not any(pool.may_rerun("never", tool) for tool in expected)
        scoped = pool.scoped(["hints"])
        assert scoped.idempotent("hints", "charge") is False and scoped.may_rerun("hints", "put_value")
        with pytest.raises(Forbidden):
            scoped.may_rerun("always", "charge")
        with pytest.raises(NotFound):
            pool.idempotent("nope", "charge")


async def test_open_all_connects_every_server_and_records_failures(tmp_path: Path) -> None:
    broken = StdioServerConfig(command=sys.executable, args=["-c", "raise SystemExit(1)"])
    servers = {"a": stdio_config(tmp_path), "b": stdio_config(tmp_path), "broken": broken}
    async with OpsMcpClient(servers) as pool:
        assert {info.state for info in pool.servers_info()} == {"idle"}
        await pool.open_all()
        assert [_info(pool, name).state for name in ("a", "b")] == ["ready", "ready"]
        assert len(started_pids(tmp_path)) == 2
        assert _info(pool, "broken").state == "idle" and _info(pool, "broken").last_error
        await pool.open_all()  # open sessions are kept, not reopened
        assert len(started_pids(tmp_path)) == 2


async def test_unset_max_concurrency_takes_the_pool_default(tmp_path: Path) -> None:
    config = stdio_config(tmp_path).model_copy(update={"max_concurrency": None})
    pool = OpsMcpClient({"t": config}, default_concurrency=2)
    async with pool, anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(pool.call_tool, "t", "sleep", {"seconds": 0.5, "tag": str(i)})
    assert _most_in_flight(tmp_path) == 2


async def test_eager_connects_everything_on_entry(tmp_path: Path) -> None:
    broken = StdioServerConfig(command=sys.executable, args=["-c", "raise SystemExit(1)"])
    async with OpsMcpClient({"t": stdio_config(tmp_path), "broken": broken}, eager=True) as pool:
        assert _info(pool, "t").state == "ready"
        assert _info(pool, "t").tool_count > 0
        assert _info(pool, "broken").state == "idle"
        assert _info(pool, "broken").last_error


async def test_example_server_tools(tmp_path: Path) -> None:
    async with OpsMcpClient({"example": example_server_config()}) as pool:
        names = {tool.name for tool in await pool.list_tools("example")}
        assert names == {"echo", "add", "word_count", "utc_now", "sleep"}
        assert _text(await pool.call_tool("example", "add", {"a": 2, "b": 3.5})) == "5.5"
        assert _text(await pool.call_tool("example", "word_count", {"text": "one two  three"})) == "3"
        assert _text(await pool.call_tool("example", "echo", {"text": "hé"})) == "hé"
        assert "+00:00" in _text(await pool.call_tool("example", "utc_now", {}))
        ticks: list[float] = []

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            ticks.append(progress)

        slept = await pool.call_tool("example", "sleep", {"seconds": 0.2}, progress_callback=progress)
        assert _text(slept) == "slept 0.2s" and ticks[-1] == 10
        with pytest.raises(ToolError) as too_long:
            await pool.call_tool("example", "sleep", {"seconds": 999})
        assert too_long.value.message.startswith("The tool example/sleep reported an error: ")
        assert "at most" in too_long.value.message
