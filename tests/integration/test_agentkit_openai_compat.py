"""OpenAICompatible over real HTTP against the fake OpenAI-compatible server (JSON and SSE)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from agentkit import Agent, LLMError, RunStatus, tool
from agentkit.llm import Message, OpenAICompatible, ToolDefinition
from tests.support.fake_openai import FakeOpenAI, FakeOpenAIServer, spawn_fake_openai, tool_call


@tool
def testing__echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@tool
def testing__sleep(seconds: float) -> str:
    """Pretend to sleep."""
    return f"slept {seconds}"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as running:
        yield running


def client(server: FakeOpenAIServer, **options: Any) -> OpenAICompatible:
    return OpenAICompatible(
        base_url=server.base_url,
        api_key="test",
        model="fake-model",
        retry_base_delay_s=0.01,
        **options,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_agent_reaches_the_answer_through_one_tool_call(server: FakeOpenAIServer, stream: bool) -> None:
    async with client(server, stream=stream) as llm:
        result = await Agent(llm, [testing__echo]).run("please echo hello world")
    assert result.status is RunStatus.COMPLETED
    assert result.output == "done: hello world"
    assert result.steps[0].tool_calls[0].name == "testing__echo"
    assert result.steps[0].tool_calls[0].arguments == {"text": "hello world"}
    assert result.steps[0].tool_calls[0].id.startswith("call_")
    assert len(server.fake.requests) == 2
    assert all(r.get("stream", False) is stream for r in server.fake.requests)
    # usage comes from the server's usage fields (in SSE: the final usage chunk)
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    second = server.fake.requests[1]["messages"]
    assert (
        second[-2]["role"] == "assistant"
        and second[-2]["tool_calls"][0]["function"]["name"] == "testing__echo"
    )
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == result.steps[0].tool_calls[0].id


async def test_rule_mode_sleep_then_done(server: FakeOpenAIServer) -> None:
    async with client(server) as llm:
        result = await Agent(llm, [testing__sleep, testing__echo]).run("sleep 2 then stop")
    assert result.steps[0].tool_calls[0].arguments == {"seconds": 2}
    assert result.output == "done: slept 2.0"


async def test_no_tools_answers_the_goal_reversed(server: FakeOpenAIServer) -> None:
    async with client(server) as llm:
        response = await llm.chat([Message.user("abc")])
    assert response.content == "cba"
    assert "tools" not in server.fake.requests[0]


async def test_tool_choice_and_options_are_sent(server: FakeOpenAIServer) -> None:
    server.fake.script("ok", "ok")
    definition = ToolDefinition(name="testing__echo", parameters={"type": "object", "properties": {}})
    async with client(server, temperature=0, max_tokens=50, seed=7, parallel_tool_calls=False) as llm:
        await llm.chat([Message.user("x")], tools=[definition], tool_choice="testing__echo")
        await llm.chat([Message.user("x")], tools=[definition], tool_choice="required")
    first, second = server.fake.requests
    assert first["tool_choice"] == {"type": "function", "function": {"name": "testing__echo"}}
    assert first["temperature"] == 0 and first["max_tokens"] == 50 and first["seed"] == 7
    assert first["parallel_tool_calls"] is False
    assert second["tool_choice"] == "required"


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retries_with_backoff_on_429_and_5xx(server: FakeOpenAIServer, status: int) -> None:
    server.fake.fail_next(status, times=2, retry_after=0 if status == 429 else None)
    async with client(server, max_retries=3) as llm:
        response = await llm.chat([Message.user("abc")])
    assert response.content == "cba"
    assert len(server.fake.requests) == 3


async def test_retries_run_out_and_the_run_fails_with_the_reason(server: FakeOpenAIServer) -> None:
    server.fake.fail_next(500, times=5)
    async with client(server, max_retries=2) as llm:
        result = await Agent(llm).run("abc")
    assert result.status is RunStatus.FAILED
    assert "HTTP 500" in (result.error or "") and "after retries" in (result.error or "")
    assert len(server.fake.requests) == 3


async def test_client_errors_are_not_retried() -> None:
    with FakeOpenAIServer(FakeOpenAI(mode="scripted")) as server:
        async with client(server, max_retries=3) as llm:
            with pytest.raises(LLMError, match="HTTP 400") as info:
                await llm.chat([Message.user("abc")])
    assert info.value.status_code == 400 and not info.value.retryable
    assert len(server.fake.requests) == 1


async def test_a_slow_server_hits_the_client_timeout(server: FakeOpenAIServer) -> None:
    server.fake.script({"content": "late", "delay": 30})
    async with client(server, timeout_s=0.2, max_retries=0) as llm:
        with pytest.raises(LLMError, match=r"timeout_s=0.2") as info:
            await llm.chat([Message.user("x")])
    assert info.value.retryable


async def test_unreachable_server_is_an_llm_error() -> None:
    with FakeOpenAIServer() as server:
        url = server.base_url
    llm = OpenAICompatible(base_url=url, api_key="x", max_retries=1, retry_base_delay_s=0.01, timeout_s=5)
    with pytest.raises(LLMError, match="Cannot reach the model server"):
        await llm.chat([Message.user("x")])
    await llm.aclose()


def test_missing_key_for_openai_says_what_to_do() -> None:
    saved = {k: os.environ.pop(k) for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL") if k in os.environ}
    try:
        with pytest.raises(LLMError, match="OPENAI_API_KEY"):
            OpenAICompatible()
    finally:
        os.environ.update(saved)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_local_server_quirks_do_not_break_the_loop(stream: bool) -> None:
    quirks = {"empty_ids", "random_chunk_ids"}
    with FakeOpenAIServer(FakeOpenAI(quirks=quirks)) as server:
        server.fake.script(
            {
                "content": None,
                "tool_calls": [
                    {"name": "testing__echo", "arguments": {"text": "a"}},
                    {"name": "testing__echo", "arguments": {"text": "b"}},
                ],
            }
        )
        async with client(server, stream=stream) as llm:
            result = await Agent(llm, [testing__echo]).run("echo x")
    ids = [c.id for c in result.steps[0].tool_calls]
    assert len(set(ids)) == 2 and all(ids)  # empty ids replaced, unique
    assert [c.arguments for c in result.steps[0].tool_calls] == [{"text": "a"}, {"text": "b"}]
    assert result.output == "done: b"


async def test_tool_calls_written_as_text_are_recognised() -> None:
    with FakeOpenAIServer(FakeOpenAI(quirks={"text_tool_calls"})) as server:
        async with client(server) as llm:
            result = await Agent(llm, [testing__echo]).run("echo hi")
    assert result.steps[0].tool_calls[0].name == "testing__echo"
    assert result.output == "done: hi"


async def test_tool_results_as_user_for_templates_that_drop_tool_messages(server: FakeOpenAIServer) -> None:
    server.fake.script(tool_call("testing__echo", text="zz"), "final")
    async with client(server, tool_results_as_user=True) as llm:
        result = await Agent(llm, [testing__echo]).run("echo zz")
    assert result.output == "final"
    sent = server.fake.requests[1]["messages"]
    assert all(m["role"] != "tool" and "tool_calls" not in m for m in sent)
    assert sent[-1] == {"role": "user", "content": "Result of tool testing__echo: zz"}


async def test_fake_server_as_a_separate_process() -> None:
    with spawn_fake_openai("--fail-first", "1", "--fail-status", "503") as base_url:
        async with OpenAICompatible(base_url=base_url, model="fake-model", retry_base_delay_s=0.01) as llm:
            result = await Agent(llm, [testing__echo]).run("echo across processes")
    assert result.output == "done: across processes"
