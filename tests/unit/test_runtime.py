"""The runtime's binding rules and an in-process Runtime serving real HTTP on a free port."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
from mcp import Client

from opspawn_mcp.config import parse_config
from opspawn_mcp.errors import Forbidden
from opspawn_mcp.principals import LOCAL, Principals
from opspawn_mcp.runtime import Runtime, bind_http, check_bind
from opspawn_mcp.store.memory import MemoryStore

NO_TOKENS = Principals.from_config(parse_config({}, environ={}), {})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_token(host: str) -> None:
    check_bind(host, NO_TOKENS)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
@pytest.mark.parametrize(
    "server",
    [{"auth_token_env": "TOK"}, {"tokens": {"ci": {"token_env": "TOK"}}}],
    ids=["auth_token_env", "named tokens"],
)
def test_other_addresses_need_a_token(host: str, server: dict[str, Any]) -> None:
    with pytest.raises(Forbidden, match=f"Refusing to serve on {host} without a token"):
        check_bind(host, NO_TOKENS)
    config = parse_config({"opspawn": {"server": server}}, environ={"TOK": "s3cret"})
    check_bind(host, Principals.from_config(config, {"TOK": "s3cret"}))


async def test_runtime_serves_mcp_over_http_in_process() -> None:
    # An LLM endpoint nobody listens on: the embedded worker fails the task fast, loading nothing.
    llm = {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    config = parse_config({"opspawn": {"store_url": "memory://", "llm": llm}}, environ={})
    store = MemoryStore()
    await store.start()
    ready: asyncio.Queue[str] = asyncio.Queue()
    async with Runtime(config, store=store) as runtime:
        serving = asyncio.create_task(runtime.serve_http("127.0.0.1", 0, on_ready=ready.put_nowait))
        base = await ready.get()
        async with Client(f"{base}/mcp") as client:
            task = (await client.call_tool("submit_task", {"goal": "x", "servers": []})).structured_content
            assert task is not None and task["status"] in ("queued", "running", "failed")
            assert (await runtime.service.get(task["task_id"], by=LOCAL)).spec.servers == []
        async with httpx.AsyncClient() as http:
            refused = await http.get(f"{base}/sse", headers={"Host": "evil.example"})
            assert refused.status_code == 421
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
    await store.close()


async def test_every_accepted_http_connection_has_nagle_off() -> None:
    """The listening socket says TCP, so asyncio turns Nagle off on every connection it accepts:
    without it, the second segment of each answer on a kept-alive connection waited for the
    client's delayed ACK (about 40 ms a request)."""
    sock = bind_http("127.0.0.1", 0)
    accepted: asyncio.Queue[int] = asyncio.Queue()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        accepted.put_nowait(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(connected, sock=sock)
    try:
        port = sock.getsockname()[1]
        for _ in range(2):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(accepted.get(), 30) != 0
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
