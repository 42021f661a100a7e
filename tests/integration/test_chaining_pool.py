"""The pool's part in chaining, against the testing server over real stdio: a task's calls carry
its chain in ``_meta``, and a stdio server the pool starts finds ``OPSPAWN_CHAIN`` in its
environment (``opspawn_mcp.chaining``); an exposed call relays its caller's chain."""

from __future__ import annotations

import json
from pathlib import Path

import mcp.types as types
from mcp import Client

from agentkit import IDEMPOTENCY_META_KEY
from opspawn_mcp.chaining import CHAIN_ENV, CHAIN_META_KEY, DEPTH_META_KEY, child_env, outgoing_meta
from opspawn_mcp.config import StdioServerConfig, parse_config
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.server import build_server
from opspawn_mcp.store.memory import MemoryStore
from tests.servers.harness import REPO_ROOT, opspawn_command, stdio_config
from tests.support.service_kit import make_service


def _text(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def test_a_tasks_calls_carry_its_chain_beside_the_idempotency_key(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}) as pool:
        scoped = pool.scoped(["t"], meta=outgoing_meta(["a"], "b"))
        seen = json.loads(
            _text(await scoped.call_tool("t", "echo_meta", {}, meta={IDEMPOTENCY_META_KEY: "k"}))
        )
        assert seen[CHAIN_META_KEY] == ["a", "b"] and seen[DEPTH_META_KEY] == 2
        assert seen[IDEMPOTENCY_META_KEY] == "k"
        assert CHAIN_META_KEY not in json.loads(_text(await pool.call_tool("t", "echo_meta", {})))


async def test_a_stdio_server_is_told_the_chain_of_the_process_that_started_it(tmp_path: Path) -> None:
    async with OpsMcpClient({"t": stdio_config(tmp_path)}, stdio_env=child_env(["a"], "b")) as pool:
        assert _text(await pool.call_tool("t", "env", {"name": CHAIN_ENV})) == "a,b"


async def test_an_exposed_call_relays_the_callers_chain_and_refuses_a_loop(tmp_path: Path) -> None:
    config = parse_config(
        {"opspawn": {"store_url": "memory://", "chaining": {"instance_id": "b"}}}, environ={}
    )
    exposed = stdio_config(tmp_path).model_copy(update={"expose": True})
    store = MemoryStore()
    await store.start()
    async with OpsMcpClient({"t": exposed}, eager=True) as pool:
        server = build_server(make_service(store, config=config), pool=pool)
        async with Client(server) as client:
            relayed = await client.call_tool(
                "t__echo_meta", {}, meta={CHAIN_META_KEY: ["a"], DEPTH_META_KEY: 1}
            )
            seen = json.loads(_text(relayed))
            assert seen[CHAIN_META_KEY] == ["a", "b"] and seen[DEPTH_META_KEY] == 2
            looped = await client.call_tool(
                "t__echo_meta", {}, meta={CHAIN_META_KEY: ["b"], DEPTH_META_KEY: 1}
            )
            assert looped.is_error and "loop_detected" in _text(looped) and "(b → b)" in _text(looped)
    await store.close()


async def test_an_opspawn_downstreams_submit_task_is_rerun_after_a_crash(tmp_path: Path) -> None:
    """A real opspawn over stdio: its submit_task is annotated not idempotent, yet the pool lets
    a resumed run send it again, because the call's idempotency key makes B answer the task it
    already started (opspawn_mcp.idempotency); its other tools keep their annotations."""
    config = tmp_path / "b.json"
    config.write_text(json.dumps({"opspawn": {"store_url": "memory://"}}))
    b = StdioServerConfig(
        command=opspawn_command(),
        args=["--config", str(config), "serve", "--stdio"],
        env={"PYTHONPATH": str(REPO_ROOT)},
    )
    async with OpsMcpClient({"b": b, "t": stdio_config(tmp_path)}, eager=True) as pool:
        assert pool.may_rerun("b", "submit_task") and pool.idempotent("b", "submit_task") is True
        assert not pool.may_rerun("b", "approve_task")
        assert pool.idempotent("t", "submit_task") is None  # not an opspawn: nothing known
