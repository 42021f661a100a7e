"""How the worker turns a stored spec into model settings and a model client (no services needed)."""

from __future__ import annotations

import pytest

from agentkit.llm import OpenAICompatible
from opspawn_mcp.agent_factory import AgentSetupError, build_llm, resolve_model
from opspawn_mcp.config import LlmDefaults
from opspawn_mcp.models import ModelSettings

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
