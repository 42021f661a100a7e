"""Idempotency through MCP, against the real testing server in process (mcp.Client): annotations
become ``Tool.idempotent``, every call carries its key in ``_meta``, and a resumed run sends the
same key again for the same call."""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import mcp.types as types
from mcp import Client

from agentkit import (
    IDEMPOTENCY_META_KEY,
    INTERRUPTED_MESSAGE,
    Agent,
    McpCaller,
    MemoryJournal,
    RunStatus,
    ToolCall,
    expand_server_tools,
    idempotent_from_annotations,
    mcp_proxy_tool,
)
from agentkit.llm import ChatRequest, ScriptedLLM, call
from agentkit.llm.base import LLMResponse
from tests.servers.testing_server import server as testing_server
from tests.support.callers import OldCaller
from tests.unit.agentkit import doubles
from tests.unit.agentkit.doubles import SessionCaller


def open_caller() -> AbstractAsyncContextManager[SessionCaller]:
    return doubles.open_caller({"testing": testing_server})


def test_the_test_caller_satisfies_the_protocol() -> None:
    assert isinstance(SessionCaller({}), McpCaller)


def test_annotations_map_to_idempotency() -> None:
    hints = types.ToolAnnotations
    assert idempotent_from_annotations(None) is None
    assert idempotent_from_annotations(hints()) is None
    assert idempotent_from_annotations(hints(read_only_hint=True)) is True
    assert idempotent_from_annotations(hints(read_only_hint=False, idempotent_hint=True)) is True
    assert idempotent_from_annotations(hints(idempotent_hint=False)) is False
    assert idempotent_from_annotations(hints(read_only_hint=False)) is False


async def test_flat_tools_take_idempotency_from_the_downstream_annotations() -> None:
    async with open_caller() as caller:
        tools = {t.name: t for t in await expand_server_tools(caller, ["testing"])}
        assert tools["testing__echo_meta"].idempotent is True  # readOnlyHint
        assert tools["testing__put_value"].idempotent is True  # idempotentHint
        assert tools["testing__charge"].idempotent is False  # both explicitly false
        assert tools["testing__echo"].idempotent is None  # no annotations


async def test_the_proxy_answers_idempotency_for_the_tool_a_call_targets() -> None:
    async with open_caller() as caller:
        proxy = mcp_proxy_tool(caller)
        assert proxy.idempotent is None

        def target(server: Any, tool: Any) -> ToolCall:
            return ToolCall(id="1", name=proxy.name, arguments={"server": server, "tool": tool})

        assert await proxy.idempotent_for(target("testing", "put_value")) is True
        assert await proxy.idempotent_for(target("testing", "charge")) is False
        assert await proxy.idempotent_for(target("testing", "echo")) is None
        assert await proxy.idempotent_for(target("testing", "no_such_tool")) is None
        assert await proxy.idempotent_for(target("elsewhere", "put_value")) is None  # cannot list
        assert await proxy.idempotent_for(target(None, "put_value")) is None


def meta_of(content: str | None) -> dict[str, Any]:
    value = json.loads(content or "{}")
    assert isinstance(value, dict)
    return value


async def test_every_downstream_call_carries_its_key_in_meta() -> None:
    async with open_caller() as caller:
        tools = [*await expand_server_tools(caller, ["testing"]), mcp_proxy_tool(caller)]
        llm = ScriptedLLM(
            [
                call("testing__echo_meta"),
                call("mcp_proxy_tool", server="testing", tool="echo_meta", arguments={}),
                "done",
            ]
        )
        result = await Agent(llm, tools).run("show me the meta", run_id="task-1")
        assert result.status is RunStatus.COMPLETED
        seen = [meta_of(s.tool_results[0].content) for s in result.steps[:2]]
        assert [m[IDEMPOTENCY_META_KEY] for m in seen] == ["task-1:1:1", "task-1:2:2"]
        assert [c.meta for c in caller.calls] == [
            {IDEMPOTENCY_META_KEY: "task-1:1:1"},
            {IDEMPOTENCY_META_KEY: "task-1:2:2"},
        ]


async def test_a_caller_without_meta_still_works_without_the_key() -> None:
    async with Client(testing_server) as client:
        proxy = mcp_proxy_tool(cast(McpCaller, OldCaller(client)))  # typed before meta: works at runtime
        llm = ScriptedLLM([call("mcp_proxy_tool", server="testing", tool="echo_meta", arguments={}), "ok"])
        result = await Agent(llm, [proxy]).run("meta", run_id="task-2")
        outcome = result.steps[0].tool_results[0]
        assert not outcome.is_error and IDEMPOTENCY_META_KEY not in meta_of(outcome.content)


def one_call_script(name: str, **arguments: Any) -> ScriptedLLM:
    def script(request: ChatRequest) -> LLMResponse | str:
        results = [m for m in request.messages if m.role == "tool"]
        if not results:
            return LLMResponse(tool_calls=[ToolCall(id="c1", name=name, arguments=arguments)])
        return f"result: {results[0].content}"

    return ScriptedLLM([script], repeat_last=True)


async def test_a_resumed_run_sends_the_same_key_for_the_interrupted_idempotent_call() -> None:
    async with open_caller() as caller:
        tools = await expand_server_tools(caller, ["testing"])
        journal = MemoryJournal()
        first = await Agent(one_call_script("testing__echo_meta"), tools).run(
            "meta", journal=journal, run_id="task-9"
        )
        assert first.status is RunStatus.COMPLETED
        # The worker died while the call was in flight: the journal ends at its tool_started.
        resumed_journal = MemoryJournal(journal.entries[:2])
        assert resumed_journal.entries[-1].kind == "tool_started"
        llm = one_call_script("testing__echo_meta")
        again = await Agent(llm, tools).run("meta", journal=resumed_journal, run_id="task-9")
        assert again.status is RunStatus.COMPLETED
        keys = [meta_of(r.steps[0].tool_results[0].content)[IDEMPOTENCY_META_KEY] for r in (first, again)]
        assert keys == ["task-9:1:1", "task-9:1:1"]  # a downstream server can de-duplicate on it
        assert len(caller.calls) == 2 and len(llm.calls) == 1  # re-run (read-only), not re-planned


async def test_an_interrupted_non_idempotent_downstream_call_is_not_repeated() -> None:
    async with open_caller() as caller:
        tools = await expand_server_tools(caller, ["testing"])
        journal = MemoryJournal()
        await Agent(one_call_script("testing__charge", amount=5), tools).run("charge", journal=journal)
        assert len(caller.calls) == 1
        resumed = await Agent(one_call_script("testing__charge", amount=5), tools).run(
            "charge", journal=MemoryJournal(journal.entries[:2])
        )
        assert len(caller.calls) == 1  # charge is annotated not idempotent: never silently repeated
        assert resumed.steps[0].tool_results[0].content == INTERRUPTED_MESSAGE
        assert resumed.output == f"result: {INTERRUPTED_MESSAGE}"

        # Through the proxy, the decision comes from the annotations of the targeted tool.
        proxy = mcp_proxy_tool(caller)
        journal = MemoryJournal()
        script = (
            "mcp_proxy_tool",
            {"server": "testing", "tool": "put_value", "arguments": {"key": "k", "value": "v"}},
        )
        await Agent(one_call_script(script[0], **script[1]), [proxy]).run("put", journal=journal)
        await Agent(one_call_script(script[0], **script[1]), [proxy]).run(
            "put", journal=MemoryJournal(journal.entries[:2])
        )
        assert [c.tool for c in caller.calls[1:]] == ["put_value", "put_value"]  # idempotent: re-run
