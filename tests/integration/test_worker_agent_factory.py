"""How the worker turns a stored spec into model settings and a model client (no services needed)."""

from __future__ import annotations

from typing import Any

import pytest

from agentkit import ReActPlanner
from agentkit.llm import LocalGGUF, OpenAICompatible
from agentkit.mcp_proxy import PROXY_TOOL_NAME
from opspawn_mcp.agent_factory import (
    SMALL_MODEL_SYSTEM_PROMPT,
    AgentSetupError,
    build_agent,
    build_llm,
    close_llm,
    resolve_model,
)
from opspawn_mcp.config import LlmDefaults, load_config
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.models import ModelSettings, TaskSpec

DEFAULTS = LlmDefaults(
    provider="openai", base_url="http://127.0.0.1:9/v1", model="default-model", api_key_env="DEFAULT_KEY"
)


def test_unset_fields_come_from_the_defaults_of_the_same_provider() -> None:
    resolved = resolve_model(ModelSettings(model="mine"), DEFAULTS)
    assert resolved.provider == "openai"
    assert resolved.model == "mine"
    assert resolved.base_url == DEFAULTS.base_url
    assert resolved.api_key_env == "DEFAULT_KEY"


def test_another_provider_inherits_nothing() -> None:
    resolved = resolve_model(ModelSettings(provider="local"), DEFAULTS)
    assert resolved.provider == "local"
    assert resolved.base_url is None and resolved.model is None and resolved.api_key_env is None


def test_the_key_is_read_from_the_named_variable_at_build_time() -> None:
    settings = resolve_model(ModelSettings(), DEFAULTS)
    llm = build_llm(settings, DEFAULTS, environ={"DEFAULT_KEY": "sk-from-env"})
    assert isinstance(llm, OpenAICompatible)
    assert llm.model == "default-model" and llm.base_url == DEFAULTS.base_url
    # The spec only ever names the variable.
    assert "sk-from-env" not in settings.model_dump_json()


def test_an_unset_key_variable_says_which_and_where() -> None:
    settings = resolve_model(ModelSettings(), DEFAULTS)
    with pytest.raises(AgentSetupError, match="DEFAULT_KEY, which is not set in the worker's environment"):
        build_llm(settings, DEFAULTS, environ={})


def test_openai_without_a_model_name_says_what_to_set() -> None:
    defaults = LlmDefaults(provider="openai", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(AgentSetupError, match=r"set model\.model in the task or opspawn\.llm\.model"):
        build_llm(resolve_model(ModelSettings(), defaults), defaults, environ={})


# -- the agent for the bundled small local model -------------------------------------------------

FLAT = ["example__echo", "example__add", "example__word_count", "example__utc_now", "example__sleep"]


async def _ignore(event: Any) -> None:
    return None


async def test_the_local_model_gets_flat_tools_a_short_prompt_and_one_tool_round() -> None:
    # A 135M model cannot fill in mcp_proxy_tool's server/tool/arguments; it copies the schema
    # into the arguments instead. With only the flat tools it picks echo and writes {"text": ...}.
    config = load_config(None, environ={})  # the embedded default: the example server, local model
    async with OpsMcpClient(config.mcp_servers) as pool:
        agent, llm = await build_agent(TaskSpec(goal="echo hello"), config, pool, _ignore)
        try:
            assert isinstance(llm, LocalGGUF)
            assert sorted(agent.tools.names()) == sorted(FLAT)
            assert PROXY_TOOL_NAME not in agent.tools
            assert isinstance(agent.planner, ReActPlanner)
            assert agent.planner.require_tool_first and agent.planner.max_tool_rounds == 1
            assert agent.system_prompt == SMALL_MODEL_SYSTEM_PROMPT
        finally:
            await close_llm(llm)

        # What the task asks for itself is respected.
        spec = TaskSpec(goal="x", system_prompt="Be brief.", planner="plan_and_execute")
        agent, llm = await build_agent(spec, config, pool, _ignore)
        assert agent.system_prompt == "Be brief." and not isinstance(agent.planner, ReActPlanner)
        await close_llm(llm)

        # Any other model keeps the proxy next to the flat tools, and the generic setup.
        remote = TaskSpec(
            goal="x", model=ModelSettings(provider="openai", base_url="http://127.0.0.1:9/v1", model="m")
        )
        agent, llm = await build_agent(remote, config, pool, _ignore)
        try:
            assert sorted(agent.tools.names()) == sorted([PROXY_TOOL_NAME, *FLAT])
            assert isinstance(agent.planner, ReActPlanner) and not agent.planner.require_tool_first
            assert agent.system_prompt != SMALL_MODEL_SYSTEM_PROMPT
        finally:
            await close_llm(llm)


async def test_the_local_model_keeps_the_proxy_when_no_server_lists_tools() -> None:
    config = load_config(None, environ={})
    async with OpsMcpClient(config.mcp_servers) as pool:
        agent, llm = await build_agent(TaskSpec(goal="x", servers=[]), config, pool, _ignore)
        assert agent.tools.names() == [PROXY_TOOL_NAME]
        await close_llm(llm)
