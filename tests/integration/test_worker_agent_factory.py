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
    LlmClients,
    build_agent,
    open_llm,
    profile_for,
)
from opspawn_mcp.config import Config, LlmProfile, load_config, parse_config
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.models import ModelSettings, TaskSpec
from opspawn_mcp.telemetry.hooks import ObservedLLM

PROFILE = LlmProfile(
    provider="openai", base_url="http://127.0.0.1:9/v1", model="default-model", api_key_env="DEFAULT_KEY"
)


def config_with(**models: dict[str, Any]) -> Config:
    return parse_config(
        {"opspawn": {"llm": PROFILE.model_dump(), "models": models}}, environ={"DEFAULT_KEY": "k", "K2": "k2"}
    )


def test_the_profile_comes_from_the_workers_config_by_name() -> None:
    config = config_with(strong={"provider": "openai", "base_url": "http://127.0.0.1:8/v1", "model": "big"})
    assert profile_for(ModelSettings(), config) == PROFILE
    assert profile_for(ModelSettings(profile="strong"), config).model == "big"
    with pytest.raises(AgentSetupError, match=r"profile 'gone', which this worker's config does not define"):
        profile_for(ModelSettings(profile="gone"), config)


async def test_the_key_is_read_from_the_profiles_variable_when_the_client_opens() -> None:
    llm = await open_llm(PROFILE, {"DEFAULT_KEY": "sk-from-env"})
    assert isinstance(llm, OpenAICompatible)
    assert llm.model == "default-model" and llm.base_url == PROFILE.base_url
    await llm.aclose()


async def test_an_unset_key_variable_says_which_and_where() -> None:
    with pytest.raises(AgentSetupError, match="DEFAULT_KEY, which is not set in the worker's environment"):
        await open_llm(PROFILE, {})


async def test_a_profile_without_a_model_name_says_what_to_set() -> None:
    profile = LlmProfile(provider="openai", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(AgentSetupError, match=r"set its 'model' in the config"):
        await open_llm(profile, {})


async def test_every_task_of_a_profile_shares_one_client_tuned_by_its_own_settings() -> None:
    config = config_with(strong={"provider": "openai", "base_url": "http://127.0.0.1:8/v1", "model": "big"})
    llms = LlmClients(config, {"DEFAULT_KEY": "k"})
    plain = await llms.get(ModelSettings())
    assert await llms.get(ModelSettings(profile="default")) is plain
    warm = await llms.get(ModelSettings(temperature=0.3, max_tokens=7))
    assert isinstance(plain, OpenAICompatible) and isinstance(warm, OpenAICompatible)
    assert (warm.temperature, warm.max_tokens, plain.temperature) == (0.3, 7, None)
    assert warm._client is plain._client  # white-box: one connection pool for both
    strong = await llms.get(ModelSettings(profile="strong"))
    assert isinstance(strong, OpenAICompatible) and strong._client is not plain._client
    await warm.aclose()  # a view closes nothing
    assert not plain._client.is_closed()
    await llms.aclose()
    assert plain._client.is_closed() and strong._client.is_closed()


# -- the agent for the bundled small local model -------------------------------------------------

FLAT = ["example__echo", "example__add", "example__word_count", "example__utc_now", "example__sleep"]


async def _ignore(event: Any) -> None:
    return None


async def test_the_local_model_gets_flat_tools_a_short_prompt_and_one_tool_round() -> None:
    # A 135M model cannot fill in mcp_proxy_tool's server/tool/arguments; it copies the schema
    # into the arguments instead. With only the flat tools it picks echo and writes {"text": ...}.
    config = load_config(None, environ={})  # the embedded default: the example server, local model
    llms = LlmClients(config, {})
    async with OpsMcpClient(config.mcp_servers) as pool:
        agent = await build_agent(TaskSpec(goal="echo hello"), config, pool, _ignore, llms)
        assert isinstance(agent.llm, ObservedLLM) and isinstance(agent.llm.inner, LocalGGUF)
        assert sorted(agent.tools.names()) == sorted(FLAT)
        assert PROXY_TOOL_NAME not in agent.tools
        assert isinstance(agent.planner, ReActPlanner)
        assert agent.planner.require_tool_first and agent.planner.max_tool_rounds == 1
        assert agent.system_prompt == SMALL_MODEL_SYSTEM_PROMPT

        # What the task asks for itself is respected.
        spec = TaskSpec(goal="x", system_prompt="Be brief.", planner="plan_and_execute")
        agent = await build_agent(spec, config, pool, _ignore, llms)
        assert agent.system_prompt == "Be brief." and not isinstance(agent.planner, ReActPlanner)

        # Any other model keeps the proxy next to the flat tools, and the generic setup.
        remote = config.model_copy(
            update={
                "opspawn": config.opspawn.model_copy(
                    update={"llm": PROFILE.model_copy(update={"api_key_env": None})}
                )
            }
        )
        remote_llms = LlmClients(remote, {})
        agent = await build_agent(TaskSpec(goal="x"), remote, pool, _ignore, remote_llms)
        assert sorted(agent.tools.names()) == sorted([PROXY_TOOL_NAME, *FLAT])
        assert isinstance(agent.planner, ReActPlanner) and not agent.planner.require_tool_first
        assert agent.system_prompt != SMALL_MODEL_SYSTEM_PROMPT
        await remote_llms.aclose()
    await llms.aclose()


async def test_the_local_model_keeps_the_proxy_when_no_server_lists_tools() -> None:
    config = load_config(None, environ={})
    llms = LlmClients(config, {})
    async with OpsMcpClient(config.mcp_servers) as pool:
        agent = await build_agent(TaskSpec(goal="x", servers=[]), config, pool, _ignore, llms)
        assert agent.tools.names() == [PROXY_TOOL_NAME]
    await llms.aclose()
