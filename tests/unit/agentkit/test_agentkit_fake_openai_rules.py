"""The fake OpenAI server's rule mode, which other suites rely on across processes."""

from __future__ import annotations

from typing import Any

from agentkit.mcp_proxy import flat_tool_name
from tests.support.fake_openai import rule_reply


def tools(*names: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "parameters": {}}} for n in names]


def test_echo_rule_uses_the_text_after_echo_or_the_whole_goal() -> None:
    body = {
        "messages": [{"role": "user", "content": "please echo hi there"}],
        "tools": tools("example__echo"),
    }
    assert rule_reply(body)["tool_calls"] == [{"name": "example__echo", "arguments": {"text": "hi there"}}]
    body["messages"] = [{"role": "user", "content": "say it"}]
    assert rule_reply(body)["tool_calls"][0]["arguments"] == {"text": "say it"}


def test_tool_result_rule_and_reverse_rule() -> None:
    messages = [
        {"role": "user", "content": "echo x"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "tool_call_id": "1", "content": "x"},
    ]
    assert rule_reply({"messages": messages, "tools": tools("t__echo")}) == {"content": "done: x"}
    assert rule_reply({"messages": [{"role": "user", "content": "abc"}]}) == {"content": "cba"}
    none = {
        "messages": [{"role": "user", "content": "abc"}],
        "tools": tools("t__echo"),
        "tool_choice": "none",
    }
    assert rule_reply(none) == {"content": "cba"}


def test_sleep_rule_comes_first() -> None:
    body = {
        "messages": [{"role": "user", "content": "sleep 3 then echo"}],
        "tools": tools("t__echo", "t__sleep"),
    }
    assert rule_reply(body)["tool_calls"] == [{"name": "t__sleep", "arguments": {"seconds": 3}}]


def test_flat_tool_names_are_api_safe() -> None:
    assert flat_tool_name("files", "read_file") == "files__read_file"
    assert flat_tool_name("my server", "get.time") == "my_server__get_time"
    assert len(flat_tool_name("s" * 40, "t" * 40)) == 64
