"""``mcpServers.X.tools``: include/exclude validated with precise problems, matched by fnmatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opspawn_mcp.config import ToolFilter, describe, parse_config
from opspawn_mcp.errors import ConfigError


def problems_of(tools: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"mcpServers": {"fs": {"command": "fs", "tools": tools}}}, "test.json", {})
    return info.value.problems


def test_exclude_names_the_pattern_that_hides_a_tool() -> None:
    curation = ToolFilter(exclude=["delete_*", "move"])
    assert curation.hidden_reason("read_file") is None
    assert curation.hidden_reason("delete_file") == "excluded by 'delete_*'"
    assert curation.hidden_reason("move") == "excluded by 'move'"
    assert curation.hidden_reason("Delete_file") is None  # case-sensitive on every OS


def test_include_hides_everything_it_does_not_match_and_exclude_still_applies() -> None:
    curation = ToolFilter(include=["read_*", "list_dir"], exclude=["read_secret"])
    assert curation.hidden_reason("read_file") is None
    assert curation.hidden_reason("write_file") == "not included by 'read_*', 'list_dir'"
    assert curation.hidden_reason("read_secret") == "excluded by 'read_secret'"


def test_entries_matching_no_listed_tool_are_reported_as_unmatched() -> None:
    curation = ToolFilter(include=["read_*", "raed_file"], exclude=["delete_*"])
    assert curation.unmatched(["read_file", "write_file"]) == ["raed_file", "delete_*"]


def test_a_server_without_tools_key_shows_every_tool() -> None:
    config = parse_config({"mcpServers": {"fs": {"command": "fs"}}}, "test.json", {})
    assert config.mcp_servers["fs"].tools == ToolFilter()
    assert config.mcp_servers["fs"].tools.hidden_reason("anything") is None


@pytest.mark.parametrize(
    ("tools", "problem"),
    [
        ({"include": []}, "mcpServers.fs.tools.include: [] would hide every tool"),
        ({"exclude": [" x"]}, "mcpServers.fs.tools.exclude: ' x' is not a tool name or pattern"),
        ({"exclude": [""]}, "mcpServers.fs.tools.exclude: '' is not a tool name or pattern"),
        ({"exclude": ["a", "a"]}, "mcpServers.fs.tools.exclude: lists a pattern twice"),
        ({"exclude": "delete_*"}, "mcpServers.fs.tools.exclude:"),
        ({"hide": ["x"]}, "mcpServers.fs.tools.hide: unknown key"),
        (["x"], "mcpServers.fs.tools:"),
    ],
)
def test_bad_filters_are_config_problems_naming_the_key(tools: object, problem: str) -> None:
    problems = problems_of(tools)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_describe_says_what_agents_and_clients_see() -> None:
    config = parse_config(
        {"mcpServers": {"fs": {"command": "fs", "tools": {"include": ["read_*"], "exclude": ["read_key"]}}}},
        "test.json",
        {},
    )
    assert "server 'fs': agents and MCP clients see read_* except read_key" in describe(config)


def test_config_check_warns_of_an_exclude_that_matches_no_included_tool(tmp_path: Path) -> None:
    path = tmp_path / "opspawn.json"
    tools = {"include": ["read_file", "list_dir"], "exclude": ["list_dir", "delete_*"]}
    path.write_text(json.dumps({"mcpServers": {"fs": {"command": "fs", "tools": tools}}}))
    out = subprocess.run(
        [sys.executable, "-m", "opspawn_mcp.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "  warning: mcpServers.fs.tools: exclude 'delete_*' matches none of the included tools" in (
        out.stdout.splitlines()
    )
    assert "list_dir' matches none" not in out.stdout
