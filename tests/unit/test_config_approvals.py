"""The approval settings: which tools need a person's yes, how long a request waits, and what
``config check`` says about them."""

from __future__ import annotations

from typing import Any

import pytest

from agentkit import ToolCall
from agentkit.mcp_proxy import PROXY_TOOL_NAME
from opspawn_mcp.agent_factory import approval_policy
from opspawn_mcp.config import describe, parse_config
from opspawn_mcp.errors import ConfigError


def config(require: Any, **approvals: Any) -> dict[str, Any]:
    return {
        "mcpServers": {
            "files": {"command": "python", "require_approval": require},
            "web": {"url": "http://127.0.0.1:1/mcp"},
        },
        "opspawn": {"store_url": "memory://", "approvals": approvals},
    }


def test_a_list_of_tools_or_a_star_marks_calls_for_approval_and_config_check_says_so() -> None:
    listed = parse_config(config(["delete_file", "move_file"], timeout_s=90), environ={})
    every = parse_config(config("*"), environ={})

    assert listed.mcp_servers["files"].needs_approval("delete_file")
    assert not listed.mcp_servers["files"].needs_approval("read_file")
    assert every.mcp_servers["files"].needs_approval("read_file")
    assert not every.mcp_servers["web"].needs_approval("read_file")
    assert every.opspawn.approvals.timeout_s == 3600  # the default: an hour
    lines = describe(listed)
    assert (
        "server 'files': a person approves each call of delete_file, move_file; unanswered after 90 s it is denied"
        in lines
    )
    assert any(
        "server 'files': a person approves each call of every tool" in line for line in describe(every)
    )


@pytest.mark.parametrize("bad", ["delete_file", ["ok", ""], [1], {"delete_file": True}])
def test_a_bad_require_approval_names_its_path_and_the_two_shapes(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(bad), environ={})
    assert info.value.problems == [
        'mcpServers.files.require_approval: must be a list of tool names (e.g. ["delete_file"]) or "*" for every tool'
    ]


@pytest.mark.parametrize("timeout", [0, -1, "soon", 10**9])
def test_a_bad_approval_timeout_is_a_config_problem(timeout: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config([], timeout_s=timeout), environ={})
    assert [p.split(":")[0] for p in info.value.problems] == ["opspawn.approvals.timeout_s"]


def test_the_timeout_has_an_env_override() -> None:
    parsed = parse_config(config([]), environ={"OPSPAWN_APPROVALS_TIMEOUT_S": "5"})
    assert parsed.opspawn.approvals.timeout_s == 5


def test_the_policy_gates_flat_and_proxy_calls_to_the_named_tools_only() -> None:
    policy = approval_policy(parse_config(config(["delete_file"]), environ={}))
    assert policy is not None

    def gated(name: str, **arguments: Any) -> bool:
        return bool(policy(ToolCall(id="c", name=name, arguments=arguments), None))

    assert gated("files__delete_file", path="/x")
    assert gated(PROXY_TOOL_NAME, server="files", tool="delete_file", arguments={"path": "/x"})
    assert not gated("files__read_file", path="/x")
    assert not gated(PROXY_TOOL_NAME, server="web", tool="delete_file")
    assert not gated("web__delete_file")
    assert approval_policy(parse_config(config([]), environ={})) is None
