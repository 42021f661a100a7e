"""Aggregated tools end to end: a real ``opspawn-mcp serve`` over streamable HTTP exposes two
testing servers (same tool names) as ``server__tool`` to the SDK's client, with curation, calls,
progress, cancellation, the audit record and ``tools/list_changed`` after a downstream change,
and when a downstream process dies and comes back; their resources (``opspawn+server://``) and
prompts (``server__prompt``) too, with their ``list_changed``."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import mcp.types as types
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import PromptsListChanged, ResourcesListChanged

from tests.servers.harness import HANG_GUARD_S, REPO_ROOT, lines, wait_until, wait_until_async
from tests.support.serve import ServerProcess, write_config


def _testing(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "command": sys.executable,
        "args": ["-m", "tests.servers.testing_server", "--cancel-file", str(tmp_path / "cancels")],
        "cwd": str(REPO_ROOT),
        **extra,
    }


SECRET = "hush-hush-42"
"""alpha's ${COMPOSE_SECRET}: never in the audit."""
_OMEGA_ARGS = ["-m", "tests.servers.testing_server", "--exit-if-exists"]
"""omega is killed by its test, and kept down while the file named after these arguments exists."""


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("compose")
    config = write_config(tmp / "opspawn.json", "http://127.0.0.1:9/v1")
    raw = json.loads(config.read_text())
    raw["mcpServers"] = {
        "alpha": _testing(tmp, expose=True, env={"COMPOSE_SECRET": "${COMPOSE_SECRET}"}),
        "beta": _testing(tmp, expose=True, tools={"exclude": ["crash", "fail*"]}),
        "gamma": _testing(tmp),
        "omega": {**_testing(tmp, expose=True), "args": [*_OMEGA_ARGS, str(tmp / "omega-down")]},
    }
    config.write_text(json.dumps(raw))
    server = ServerProcess(config, env={"COMPOSE_SECRET": SECRET})
    yield server
    assert server.stop() == 0, server.log.read_text()
    assert "Traceback" not in server.log.read_text()


def text(result: types.CallToolResult) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def tool_names(client: Client) -> set[str]:
    return {tool.name for tool in (await client.list_tools(cache_mode="bypass")).tools}


async def listed(client: Client, *names: str) -> set[str]:
    """The tool names once ``names`` are among them (the pool connects in the background)."""

    async def present() -> bool:
        return set(names) <= await tool_names(client)

    await wait_until_async(present)
    return await tool_names(client)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_clashing_tools_of_two_servers_are_listed_and_called_by_their_server_name(
    serve: ServerProcess, mode: str
) -> None:
    async with Client(serve.url, mode=mode) as client:
        names = await listed(client, "alpha__echo", "beta__echo")
        assert {"submit_task", "list_servers", "alpha__crash", "alpha__fail"} <= names
        assert not {"beta__crash", "beta__fail"} & names  # curated out of the exposed view too
        assert not any(name.startswith("gamma__") for name in names)  # not exposed
        assert text(await client.call_tool("alpha__echo", {"text": "from alpha"})) == "from alpha"
        failed = await client.call_tool("alpha__fail", {"message": "no luck"})
        assert failed.is_error and text(failed) == "The tool alpha/fail reported an error: no luck"
        hidden = await client.call_tool("beta__crash", {})
        assert hidden.is_error and "beta__crash" in text(hidden)


async def test_progress_is_forwarded_and_a_cancelled_call_is_cancelled_downstream(
    serve: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cancels = serve.log.parent / "cancels"
    async with Client(serve.url, mode="legacy") as client:
        await listed(client, "alpha__sleep")
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        done = await client.call_tool(
            "alpha__sleep", {"seconds": 0.3, "tag": "p"}, progress_callback=on_progress
        )
        assert text(done) == "slept 0.3" and progress == sorted(progress) and progress[-1] == 3
        with anyio.move_on_after(0.5):
            await client.call_tool("alpha__sleep", {"seconds": 60, "tag": "cancel-me"})
        await wait_until(
            lambda: "cancelled cancel-me" in lines(cancels), "the downstream call's cancellation"
        )


async def test_every_exposed_call_is_recorded_for_list_servers(serve: ServerProcess) -> None:
    async with Client(serve.url, mode="legacy") as client:
        await listed(client, "beta__echo")
        await client.call_tool("beta__echo", {"text": "audited"})
    async with httpx.AsyncClient() as http:
        servers = {s["name"]: s for s in (await http.get(f"{serve.base}/v1/servers")).json()}
    beta = servers["beta"]
    assert {"by": "local", "tool": "echo", "error": None}.items() <= beta["recent_calls"][-1].items()
    assert {h["name"]: h["reason"] for h in beta["hidden"]} == {
        "crash": "excluded by 'crash'",
        "fail": "excluded by 'fail*'",
    }
    assert servers["gamma"]["recent_calls"] == []


async def test_a_downstream_tool_list_change_reaches_a_legacy_client(serve: ServerProcess) -> None:
    changed = anyio.Event()

    async def on_message(message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with Client(serve.url, mode="legacy", message_handler=on_message) as client:
        await listed(client, "alpha__add_tool")
        await client.call_tool("alpha__add_tool", {"name": "legacy_extra"})
        with anyio.fail_after(HANG_GUARD_S):
            await changed.wait()
        assert "alpha__legacy_extra" in await tool_names(client)
        assert text(await client.call_tool("alpha__legacy_extra", {"text": "x"})) == "legacy_extra: x"


async def test_a_downstream_tool_list_change_reaches_a_listening_client(serve: ServerProcess) -> None:
    async with Client(serve.url) as client:
        await listed(client, "beta__add_tool")
        async with client.listen(tools_list_changed=True) as subscription:
            await client.call_tool("beta__add_tool", {"name": "modern_extra"})
            with anyio.fail_after(HANG_GUARD_S):
                await anext(aiter(subscription))
        assert "beta__modern_extra" in await tool_names(client)


async def test_a_downstream_server_that_dies_leaves_the_list_and_comes_back(serve: ServerProcess) -> None:
    changes: list[object] = []

    async def on_message(message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changes.append(message)

    down = serve.log.parent / "omega-down"
    async with Client(serve.url, mode="legacy", message_handler=on_message) as client:
        await listed(client, "omega__pid")
        pid = int(text(await client.call_tool("omega__pid", {})))
        seen = len(changes)
        down.touch()  # the pool's reconnects fail until the file is gone
        os.kill(pid, signal.SIGKILL)

        async def gone() -> bool:
            return len(changes) > seen and not any(n.startswith("omega__") for n in await tool_names(client))

        await wait_until_async(gone)
        assert {"alpha__echo", "beta__echo"} <= await tool_names(client)
        seen = len(changes)
        down.unlink()
        await listed(client, "omega__pid")
        await wait_until(lambda: len(changes) > seen, "tools/list_changed when omega is back")
        assert int(text(await client.call_tool("omega__pid", {}))) != pid


def _only_text(contents: list[types.TextResourceContents | types.BlobResourceContents]) -> tuple[str, str]:
    [content] = contents
    assert isinstance(content, types.TextResourceContents)
    return content.uri, content.text


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_downstream_resources_and_prompts_are_listed_read_and_got_by_their_server_name(
    serve: ServerProcess, mode: str
) -> None:
    async with Client(serve.url, mode=mode) as client:
        await listed(client, "alpha__echo", "beta__echo")
        uris = {r.uri for r in (await client.list_resources(cache_mode="bypass")).resources}
        assert {
            "opspawn+server://alpha/testing://greeting",
            "opspawn+server://beta/testing://greeting",
        } <= uris
        assert not any(uri.startswith("opspawn+server://gamma/") for uri in uris)
        templates = await client.list_resource_templates(cache_mode="bypass")
        assert {"opspawn://tasks/{task_id}", "opspawn+server://alpha/testing://items/{item}"} <= {
            t.uri_template for t in templates.resource_templates
        }
        read = await client.read_resource("opspawn+server://beta/testing://items/cup")
        assert _only_text(read.contents) == ("opspawn+server://beta/testing://items/cup", "item cup")
        with pytest.raises(MCPError) as unknown:
            await client.read_resource("opspawn+server://gamma/testing://greeting")
        assert unknown.value.message == "Unknown resource: opspawn+server://gamma/testing://greeting"
        prompts = {p.name for p in (await client.list_prompts(cache_mode="bypass")).prompts}
        assert {"alpha__greet", "beta__greet"} <= prompts
        got = await client.get_prompt("beta__greet", {"name": "Bo"})
        assert [getattr(m.content, "text", None) for m in got.messages] == ["Say hello to Bo."]


async def test_downstream_resource_and_prompt_list_changes_reach_a_legacy_client(
    serve: ServerProcess,
) -> None:
    resources, prompts = anyio.Event(), anyio.Event()

    async def on_message(message: object) -> None:
        if isinstance(message, types.ResourceListChangedNotification):
            resources.set()
        if isinstance(message, types.PromptListChangedNotification):
            prompts.set()

    async with Client(serve.url, mode="legacy", message_handler=on_message) as client:
        await listed(client, "alpha__add_content")
        await client.list_resources(cache_mode="bypass")
        await client.call_tool("alpha__add_content", {"name": "legacy_fresh"})
        with anyio.fail_after(HANG_GUARD_S):
            await resources.wait()
            await prompts.wait()
        uris = {r.uri for r in (await client.list_resources(cache_mode="bypass")).resources}
        assert "opspawn+server://alpha/testing://added/legacy_fresh" in uris
        got = await client.get_prompt("alpha__legacy_fresh")
        assert [getattr(m.content, "text", None) for m in got.messages] == ["added prompt legacy_fresh"]


async def test_downstream_resource_and_prompt_list_changes_reach_a_listening_client(
    serve: ServerProcess,
) -> None:
    async with Client(serve.url) as client:
        await listed(client, "beta__add_content")
        async with client.listen(resources_list_changed=True, prompts_list_changed=True) as subscription:
            await client.call_tool("beta__add_content", {"name": "modern_fresh"})
            events: list[object] = []
            with anyio.fail_after(HANG_GUARD_S):
                async for event in subscription:
                    events.append(event)
                    if {type(e) for e in events} >= {ResourcesListChanged, PromptsListChanged}:
                        break
        prompts = {p.name for p in (await client.list_prompts(cache_mode="bypass")).prompts}
        assert "beta__modern_fresh" in prompts


async def test_exposed_calls_reads_and_gets_are_kept_in_the_audit_with_secrets_redacted(
    serve: ServerProcess,
) -> None:
    async with Client(serve.url, mode="legacy") as client:
        await listed(client, "alpha__echo")
        await client.call_tool("alpha__echo", {"text": f"the {SECRET} inside"})
        await client.call_tool("alpha__fail", {"message": "audited failure"})
        await client.read_resource("opspawn+server://alpha/testing://items/audited")
        await client.get_prompt("alpha__greet", {"name": "Audit"})
    async with httpx.AsyncClient() as http:
        page = (await http.get(f"{serve.base}/v1/audit", params={"server": "alpha", "limit": 4})).json()
    prompt, read, failed, echo = page["calls"]
    assert {
        "principal": "local",
        "kind": "tool",
        "name": "echo",
        "outcome": "ok",
        "error": None,
    }.items() <= echo.items()
    assert echo["arguments"] == {"text": "the *** inside"} and echo["duration_ms"] >= 0
    assert (
        failed["outcome"] == "error"
        and failed["error"] == "The tool alpha/fail reported an error: audited failure"
    )
    assert (read["kind"], read["name"], read["arguments"]) == ("resource", "testing://items/audited", {})
    assert (prompt["kind"], prompt["name"], prompt["arguments"]) == ("prompt", "greet", {"name": "Audit"})
    assert SECRET not in serve.log.read_text()
