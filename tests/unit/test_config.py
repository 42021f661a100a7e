"""The config file: shapes, defaults, env overrides and the problems ``config check`` reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opspawn_mcp.config import (
    EXAMPLE_SERVER_NAME,
    HttpServerConfig,
    StdioServerConfig,
    describe,
    expand_env,
    find_config_path,
    load_config,
    parse_config,
)
from opspawn_mcp.errors import ConfigError


def problems_of(raw: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "test.json", environ or {})
    return info.value.problems


def test_claude_desktop_shape_parses_stdio_and_http_servers() -> None:
    config = parse_config(
        {
            "mcpServers": {
                "time": {"command": "uvx", "args": ["mcp-server-time"], "env": {"TZ": "UTC"}, "cwd": "/tmp"},
                "remote": {"url": "https://example.org/mcp", "headers": {"X": "1"}},
                "legacy": {"url": "http://127.0.0.1:9/sse", "transport": "sse"},
            }
        },
        environ={},
    )
    time = config.mcp_servers["time"]
    assert isinstance(time, StdioServerConfig)
    assert (time.command, time.args, time.env, time.cwd) == (
        "uvx",
        ["mcp-server-time"],
        {"TZ": "UTC"},
        "/tmp",
    )
    remote = config.mcp_servers["remote"]
    assert isinstance(remote, HttpServerConfig) and remote.transport == "streamable-http"
    assert config.mcp_servers["legacy"].transport == "sse"


def test_defaults_run_on_one_machine() -> None:
    config = load_config(None, environ={})
    assert config.opspawn.store_url.startswith("sqlite+aiosqlite:///")
    assert config.opspawn.broker_url == "embedded"
    assert config.opspawn.server.host == "127.0.0.1"
    assert list(config.mcp_servers) == [EXAMPLE_SERVER_NAME]


def test_every_problem_is_reported_with_its_json_path() -> None:
    found = problems_of(
        {
            "mcpServers": {
                "neither": {"args": []},
                "badtype": {"command": 3, "surprise": True},
                "badurl": {"url": "ftp://x"},
            },
            "opspawn": {"bogus": 1, "server": {"port": "eighty"}, "broker_url": "redis://x"},
        }
    )
    text = "\n".join(found)
    assert "mcpServers.neither: needs either 'command' (stdio) or 'url' (HTTP)" in found
    assert "mcpServers.badtype.command: Input should be a valid string" in found
    assert "mcpServers.badtype.surprise: unknown key" in found
    assert "mcpServers.badurl.url:" in text
    assert "opspawn.bogus: unknown key" in found
    assert any(p.startswith("opspawn.server.port:") for p in found)
    assert "opspawn.broker_url: must be 'embedded' or an amqp:// RabbitMQ URL" in found


def test_unset_environment_variables_are_problems() -> None:
    found = problems_of(
        {
            "mcpServers": {
                "gh": {"command": "x", "env": {"TOKEN": "${GH_TOKEN}"}},
                "web": {"url": "https://h/mcp", "headers": {"Authorization": "Bearer ${WEB_TOKEN}"}},
            },
            "opspawn": {"llm": {"api_key_env": "OPENAI_KEY"}},
        }
    )
    assert found == [
        "mcpServers.gh.env.TOKEN: environment variable GH_TOKEN is not set",
        "mcpServers.web.headers.Authorization: environment variable WEB_TOKEN is not set",
        "opspawn.llm.api_key_env: environment variable OPENAI_KEY is not set",
    ]


def test_env_references_resolve_only_when_expanded() -> None:
    config = parse_config(
        {"mcpServers": {"gh": {"command": "x", "env": {"TOKEN": "${GH_TOKEN}"}}}},
        environ={"GH_TOKEN": "s3cret"},
    )
    server = config.mcp_servers["gh"]
    assert isinstance(server, StdioServerConfig)
    assert server.env["TOKEN"] == "${GH_TOKEN}"
    assert expand_env(server.env["TOKEN"], {"GH_TOKEN": "s3cret"}) == "s3cret"


def test_opspawn_env_variables_override_file_keys() -> None:
    config = parse_config(
        {"opspawn": {"store_url": "sqlite+aiosqlite:///a.db", "server": {"port": 1000}}},
        environ={
            "OPSPAWN_STORE_URL": "memory://",
            "OPSPAWN_SERVER_PORT": "9100",
            "OPSPAWN_LLM_MODEL": "qwen",
            "OPSPAWN_WORKER_CONCURRENCY": "3",
        },
    )
    assert config.opspawn.store_url == "memory://"
    assert config.opspawn.server.port == 9100
    assert config.opspawn.llm.model == "qwen"
    assert config.opspawn.worker.concurrency == 3


def test_a_bad_override_is_reported_like_a_bad_key() -> None:
    assert problems_of({}, {"OPSPAWN_SERVER_PORT": "many"})[0].startswith("opspawn.server.port:")


def test_lookup_order_is_flag_then_env_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config_path(None, {}) is None
    (tmp_path / "opspawn.json").write_text("{}")
    assert find_config_path(None, {}) == tmp_path / "opspawn.json"
    assert find_config_path(None, {"OPSPAWN_CONFIG": "/e.json"}) == Path("/e.json")
    assert find_config_path("/f.json", {"OPSPAWN_CONFIG": "/e.json"}) == Path("/f.json")


def test_broken_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{\n  "mcpServers": {,}\n}')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems[0].startswith("line 2 column")


def test_a_file_config_does_not_add_the_example_server(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"mcpServers": {"only": {"command": "x"}}}))
    assert list(load_config(path, {}).mcp_servers) == ["only"]


def test_model_profiles_are_named_and_llm_is_the_default_one() -> None:
    config = parse_config(
        {
            "opspawn": {
                "llm": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "small"},
                "models": {
                    "strong": {"provider": "openai", "base_url": "https://x.example/v1", "model": "big"}
                },
            }
        },
        environ={},
    )
    assert list(config.opspawn.profiles) == ["default", "strong"]
    assert config.opspawn.profiles["default"].model == "small"


def test_profiles_tokens_and_their_references_are_checked() -> None:
    problems = problems_of(
        {
            "mcpServers": {"time": {"command": "t"}},
            "opspawn": {
                "models": {"default": {}, "ok": {"api_key_env": "NOPE"}},
                "server": {
                    "auth_token_env": "OLD",
                    "tokens": {
                        "local": {"token_env": "A"},
                        "bob": {"token_env": "B", "servers": ["evil"], "models": ["gone"]},
                        "carol": {"token_env": "C"},
                    },
                },
            },
        },
        environ={"A": "same", "B": "same", "OLD": "x"},
    )
    assert any(p.startswith("opspawn.models.default: the default profile is opspawn.llm") for p in problems)
    assert "opspawn.models.ok.api_key_env: environment variable NOPE is not set" in problems
    assert any(p.startswith("opspawn.server.auth_token_env: use either one token") for p in problems)
    assert any(p.startswith("opspawn.server.tokens.local: a principal name") for p in problems)
    assert "opspawn.server.tokens.bob.servers: 'evil' is not in mcpServers" in problems
    assert any(
        p.startswith("opspawn.server.tokens.bob.models: 'gone' is not a model profile") for p in problems
    )
    assert any("tokens.bob: holds the same token as tokens.local" in p for p in problems)
    assert any(
        p.startswith("opspawn.server.tokens.carol.token_env: environment variable C") for p in problems
    )


def test_a_client_endpoint_is_not_a_profile_field_and_origins_are_origins() -> None:
    problems = problems_of(
        {"opspawn": {"llm": {"base_url": "file:///etc/passwd"}, "server": {"allowed_origins": ["evil/x"]}}}
    )
    assert any(p.startswith("opspawn.llm.base_url") for p in problems)
    assert any(p.startswith("opspawn.server.allowed_origins") and "is not an origin" in p for p in problems)


def test_list_and_object_overrides_are_json_and_a_bad_one_names_its_variable() -> None:
    config = parse_config(
        {},
        environ={
            "OPSPAWN_SERVER_TOKENS": '{"a": {"token_env": "T"}}',
            "T": "t",
            "OPSPAWN_LIMITS_MAX_IN_FLIGHT": "4",
        },
    )
    assert list(config.opspawn.server.tokens) == ["a"] and config.opspawn.limits.max_in_flight == 4
    problems = problems_of({}, environ={"OPSPAWN_MODELS": "{not json"})
    assert problems and problems[0].startswith("OPSPAWN_MODELS: not valid JSON")


def test_describe_explains_profiles_and_principals_without_values() -> None:
    config = parse_config(
        {
            "opspawn": {
                "llm": {
                    "provider": "openai",
                    "base_url": "http://127.0.0.1:9/v1",
                    "model": "m",
                    "api_key_env": "K",
                },
                "server": {"tokens": {"alice": {"token_env": "ALICE", "limits": {"max_in_flight": 2}}}},
            }
        },
        environ={"K": "key-value", "ALICE": "token-value"},
    )
    text = "\n".join(describe(config))
    assert "model profile 'default': m at http://127.0.0.1:9/v1, key from $K" in text
    assert "principal 'alice' (token in $ALICE): sees its own tasks; max_in_flight=2" in text
    assert "key-value" not in text and "token-value" not in text
