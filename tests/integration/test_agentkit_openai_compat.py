"""OpenAICompatible over real HTTP against the fake OpenAI-compatible server (JSON and SSE)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from agentkit import Agent, AgentEvent, LLMError, RunStatus, tool
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


@pytest.mark.parametrize("stream", [False, True])
async def test_extra_body_fields_are_sent_at_the_top_level(server: FakeOpenAIServer, stream: bool) -> None:
    server.fake.script("ok")
    async with client(server, extra_body={"top_k": 5}, stream=stream) as llm:
        await llm.chat([Message.user("x")])
    (sent,) = server.fake.requests
    assert sent["top_k"] == 5 and "extra_body" not in sent


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


# -- nothing from the environment ------------------------------------------------------------------

ENV_VALUES = {
    "OPENAI_API_KEY": "sk-env-api-key",
    "OPENAI_ADMIN_KEY": "sk-env-admin-key",
    "OPENAI_ORG_ID": "org-env-organization",
    "OPENAI_PROJECT_ID": "proj-env-project",
    "OPENAI_WEBHOOK_SECRET": "whsec-env-secret",
    "OPENAI_CUSTOM_HEADERS": "X-Env-Header: env-header-value\nAuthorization: Bearer env-custom-auth",
}
"""Every variable the installed SDK reads (openai/lib/_client_auth.py), with values to look for."""

ENV_MARKERS = [
    "sk-env-api-key",
    "sk-env-admin-key",
    "org-env-organization",
    "proj-env-project",
    "whsec-env-secret",
    "x-env-header",
    "env-header-value",
    "env-custom-auth",
]


@pytest.fixture
def decoy() -> Iterator[FakeOpenAIServer]:
    """A server that only OPENAI_BASE_URL points at: any request it gets is a leak."""
    with FakeOpenAIServer() as running:
        yield running


@pytest.fixture
def openai_env(monkeypatch: pytest.MonkeyPatch, decoy: FakeOpenAIServer) -> None:
    for name, value in ENV_VALUES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPENAI_BASE_URL", decoy.base_url)


@pytest.mark.usefixtures("openai_env")
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_only_the_explicit_key_is_sent_and_nothing_from_the_environment(
    server: FakeOpenAIServer, decoy: FakeOpenAIServer, stream: bool
) -> None:
    async with OpenAICompatible(base_url=server.base_url, api_key="explicit-key", stream=stream) as llm:
        response = await llm.chat([Message.user("abc")])
    assert response.content == "cba"
    (received,) = server.fake.raw_requests
    assert received.header("authorization") == ["Bearer explicit-key"]
    assert [m for m in ENV_MARKERS if received.contains(m)] == []
    assert received.header("openai-organization") == [] and received.header("openai-project") == []
    assert decoy.fake.raw_requests == []


@pytest.mark.usefixtures("openai_env")
async def test_without_a_key_a_local_server_gets_no_authorization_header(
    server: FakeOpenAIServer, decoy: FakeOpenAIServer
) -> None:
    async with OpenAICompatible(base_url=server.base_url, model="fake-model") as llm:
        result = await Agent(llm, [testing__echo]).run("echo hi")
    assert result.output == "done: hi"
    assert len(server.fake.raw_requests) == 2
    for received in server.fake.raw_requests:
        assert received.header("authorization") == []
        assert [m for m in ENV_MARKERS if received.contains(m)] == []
    assert decoy.fake.raw_requests == []


@pytest.mark.usefixtures("openai_env")
async def test_organization_and_project_are_sent_only_as_passed(server: FakeOpenAIServer) -> None:
    async with OpenAICompatible(
        base_url=server.base_url, api_key="k", organization="org-explicit", project="proj-explicit"
    ) as llm:
        await llm.chat([Message.user("abc")])
    (received,) = server.fake.raw_requests
    assert received.header("openai-organization") == ["org-explicit"]
    assert received.header("openai-project") == ["proj-explicit"]
    assert [m for m in ENV_MARKERS if received.contains(m)] == []


@pytest.mark.usefixtures("openai_env")
async def test_the_default_endpoint_is_api_openai_com_and_needs_an_explicit_key() -> None:
    with pytest.raises(LLMError, match=r"needs an API key for api\.openai\.com: pass api_key=") as info:
        OpenAICompatible()
    assert 'api_key=os.environ["OPENAI_API_KEY"]' in str(info.value)
    async with OpenAICompatible(api_key="k") as llm:
        assert llm.base_url == "https://api.openai.com/v1"  # not OPENAI_BASE_URL


# -- answers that are not chat completions ---------------------------------------------------------

NOT_JSON = [
    ("<html>hello</html>", "text/html", "text/html; charset=utf-8, starts with '<html>hello</html>'"),
    ("hello", "text/plain", "text/plain; charset=utf-8, starts with 'hello'"),
    ("", "text/plain", "text/plain; charset=utf-8, an empty body"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("body", "content_type", "detail"), NOT_JSON, ids=["html", "text", "empty"])
async def test_a_200_answer_that_is_not_json_is_a_clear_llm_error(
    server: FakeOpenAIServer, stream: bool, body: str, content_type: str, detail: str
) -> None:
    server.fake.script({"raw": body, "content_type": content_type})
    async with client(server, stream=stream, max_retries=3) as llm:
        with pytest.raises(LLMError) as info:
            await llm.chat([Message.user("x")])
    assert str(info.value) == (
        f"The model server at {server.base_url} answered HTTP 200 with a body that is not a chat "
        f"completion ({detail}): check that base_url points at an OpenAI-compatible /v1 endpoint."
    )
    assert not info.value.retryable
    assert len(server.fake.requests) == 1  # not retried


WRONG_SHAPE = [
    ("{}", "no 'choices' field"),
    ("[1]", "a JSON array, not an object"),
    ('"text"', "a JSON string, not an object"),
    ('{"choices": "x"}', "'choices' is a JSON string, not a list"),
    ('{"choices": [1]}', "'choices[0]' is a JSON number, not an object"),
    ('{"error": {"message": "quota exhausted"}}', "an error instead of choices: quota exhausted"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("body", "problem"), WRONG_SHAPE, ids=[b for b, _ in WRONG_SHAPE])
async def test_json_of_the_wrong_shape_is_a_clear_llm_error(
    server: FakeOpenAIServer, stream: bool, body: str, problem: str
) -> None:
    server.fake.script({"raw": body, "content_type": "application/json"})
    async with client(server, stream=stream, max_retries=3) as llm:
        with pytest.raises(LLMError) as info:
            await llm.chat([Message.user("x")])
    message = str(info.value)
    assert message.startswith(
        f"The model server at {server.base_url} answered HTTP 200 with JSON that is not a chat "
        f"completion ({problem}, starts with "
    )
    assert message.endswith("check that base_url points at an OpenAI-compatible /v1 endpoint.")
    assert not info.value.retryable and len(server.fake.requests) == 1


async def test_a_json_completion_answered_to_a_stream_request_is_read(server: FakeOpenAIServer) -> None:
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "proxy-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "plain"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    server.fake.script({"raw": json.dumps(completion), "content_type": "application/json"})
    async with client(server, stream=True) as llm:
        response = await llm.chat([Message.user("x")])
    assert server.fake.requests[0]["stream"] is True
    assert response.content == "plain" and response.usage.total_tokens == 4


@pytest.mark.parametrize(
    ("event", "detail"),
    [("[1]", "not a chat completion chunk"), ("not json", "not JSON"), ('{"choices": [1]}', "not a chat")],
    ids=["array", "not-json", "bad-choice"],
)
async def test_a_malformed_stream_event_is_a_clear_llm_error(
    server: FakeOpenAIServer, event: str, detail: str
) -> None:
    server.fake.script({"sse": [event]})
    async with client(server, stream=True, max_retries=3) as llm:
        with pytest.raises(LLMError, match=f"streamed an event that is {detail}") as info:
            await llm.chat([Message.user("x")])
    assert "check that base_url points at an OpenAI-compatible /v1 endpoint" in str(info.value)
    assert not info.value.retryable and len(server.fake.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_run_against_an_html_page_fails_with_the_reason(
    server: FakeOpenAIServer, stream: bool
) -> None:
    server.fake.script({"raw": "<html>hello</html>", "content_type": "text/html"})
    events: list[AgentEvent] = []

    async def record(event: AgentEvent) -> None:
        events.append(event)

    async with client(server, stream=stream) as llm:
        result = await Agent(llm, [testing__echo], on_event=record).run("echo hi")
    assert result.status is RunStatus.FAILED
    expected = (
        f"The model server at {server.base_url} answered HTTP 200 with a body that is not a chat completion "
        "(text/html; charset=utf-8, starts with '<html>hello</html>'): check that base_url points at an "
        "OpenAI-compatible /v1 endpoint."
    )
    assert result.error == expected
    assert [(e.kind, e.data["error"]) for e in events] == [("error", expected)]
