"""Turning a stored ``TaskSpec`` into a runnable agentkit ``Agent``.

Everything here is resolved at run time, in the worker, never at submit time:

* the task names a model *profile*; its endpoint, model and key variable come from this
  worker's config (``opspawn.llm`` is ``default``, ``opspawn.models`` the others), never from
  the task, so no client can point a worker at a URL or at an environment variable;
* the API key is read from the variable the profile names, in the worker's own environment,
  and handed straight to the client: it never enters the store, an event or a log;
* the tools are bound to ``pool.scoped(spec.servers)``, so an agent can reach only the servers
  its task allows, whatever the model asks for.

The bundled local model (``provider: local``, SmolLM2-135M by default) gets a setup of its own,
because a 135M model follows only the simplest protocol reliably (see ``SMALL_MODEL_*``):

* only the flat tools (``example__echo``, ...), not ``mcp_proxy_tool``: picking a tool by name
  and filling in its own arguments is something it can do; naming a server, a tool and a nested
  ``arguments`` object in one call is not (it copies the schema into the arguments instead);
* a short system prompt that says exactly that: call the tool for the request, then answer;
* with the default ``react`` planner, a tool call is required on the first step and the tools
  are withdrawn after one round (``ReActPlanner(require_tool_first=True, max_tool_rounds=1)``),
  so it neither answers from thin air nor loops on calls.

Downstream progress (``notifications/progress`` during a long MCP call) reaches the task: the
agent hands each MCP tool call a progress callback, and every report becomes a ``progress``
agent event, which the worker writes as a ``progress`` task event. ``PROGRESS_INTERVAL_S``
throttles them per tool call (the last report is always kept), so a chatty server cannot flood
the store.

A task's own ``system_prompt`` or ``planner: plan_and_execute`` is respected as given.

Problems a human must fix (no model name, unset key variable, no local model installed) raise
``AgentSetupError`` with a sentence saying what to change; the worker fails the task with it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import agentkit
from agentkit.llm import LLM, LocalGGUF, OpenAICompatible
from opspawn_mcp.config import DEFAULT_PROFILE, Config, LlmProfile
from opspawn_mcp.models import ModelSettings, TaskSpec

EventHandler = Callable[[Any], Awaitable[None]]


class AgentSetupError(Exception):
    """The task cannot start as specified; ``str(exc)`` tells a human what to change."""


def profile_for(settings: ModelSettings, config: Config) -> LlmProfile:
    """The config's profile the task chose (the service resolved the name at submit time)."""
    name = settings.profile or DEFAULT_PROFILE
    profile = config.opspawn.profiles.get(name)
    if profile is None:
        raise AgentSetupError(
            f"The task asks for model profile {name!r}, which this worker's config does not define "
            f"(it has: {', '.join(config.opspawn.profiles)}); add it to opspawn.models or resubmit."
        )
    return profile


def build_llm(settings: ModelSettings, profile: LlmProfile, environ: Mapping[str, str] | None = None) -> LLM:
    """The model client for ``profile`` tuned by the task's ``settings``; ``AgentSetupError``
    with a fix when it cannot be built."""
    env = os.environ if environ is None else environ
    if profile.provider == "local":
        try:
            return LocalGGUF()
        except Exception as exc:
            raise AgentSetupError(
                f"The local model cannot be loaded ({exc}); install opspawn[local-llm] on the worker "
                "or configure a profile with provider 'openai'."
            ) from exc
    if not profile.model:
        raise AgentSetupError("The model profile has no model name: set its 'model' in the config.")
    api_key: str | None = None
    if profile.api_key_env:
        api_key = env.get(profile.api_key_env)
        if not api_key:
            raise AgentSetupError(
                f"The model profile's api_key_env names {profile.api_key_env}, which is not set in the "
                "worker's environment; export it where the worker runs."
            )
    try:
        return OpenAICompatible(
            base_url=profile.base_url,
            api_key=api_key,
            model=profile.model,
            timeout_s=profile.timeout_s,
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
        )
    except Exception as exc:
        raise AgentSetupError(f"The model client cannot be created: {exc}") from exc


PROGRESS_INTERVAL_S = 0.5
"""At most one downstream progress event per tool call per this many seconds, plus the last."""

MAX_TOOL_ERRORS = 3
"""Tool calls failing in a row before the task fails: one error is an observation the model can
correct from; a streak means a broken tool or server, and the task says so instead of spending
its remaining steps."""

SMALL_MODEL_SYSTEM_PROMPT = (
    "You are a helpful assistant. Call the one function that does what the user asks, with the "
    'words from the user message as its arguments. Example: for the message "reverse abc" you call '
    'functions.x__reverse with {"text": "abc"}. Then answer with the function result.'
)
"""The system prompt of tasks on the local model that bring none of their own."""


def small_model_planner() -> agentkit.ReActPlanner:
    """ReAct as a small model can follow it: one tool round, then the answer."""
    return agentkit.ReActPlanner(require_tool_first=True, max_tool_rounds=1)


async def build_tools(caller: Any, servers: list[str], *, proxy: bool = True) -> agentkit.ToolRegistry:
    """The proxy tool plus one flat tool per downstream tool of every allowed server.

    A server that is down leaves out its flat tools only (``expand_server_tools`` logs it); the
    proxy can still reach it later if it comes back, and the agent sees the error as data. With
    ``proxy=False`` (small models) the proxy is added only when there is no flat tool at all.
    """
    registry = agentkit.ToolRegistry()
    flat = await agentkit.expand_server_tools(caller, servers)
    if proxy or not flat:
        registry.add(agentkit.mcp_proxy_tool(caller))
    for tool in flat:
        if tool.name not in registry:
            registry.add(tool)
    return registry


async def build_agent(
    spec: TaskSpec, config: Config, pool: Any, on_event: EventHandler
) -> tuple[agentkit.Agent, LLM]:
    """The agent for one task, and its LLM (the caller closes it when the run ends)."""
    profile = profile_for(spec.model, config)
    llm = build_llm(spec.model, profile)
    servers = list(spec.servers) if spec.servers is not None else list(config.mcp_servers)
    try:
        caller = pool.scoped(servers)
        small = profile.provider == "local"
        tools = await build_tools(caller, servers, proxy=not small)
        planner: str | agentkit.Planner = spec.planner
        system_prompt = spec.system_prompt
        if small:
            planner = small_model_planner() if spec.planner == "react" else spec.planner
            system_prompt = SMALL_MODEL_SYSTEM_PROMPT if system_prompt is None else system_prompt
        agent = agentkit.Agent(
            llm,
            tools,
            planner=planner,
            system_prompt=system_prompt,
            max_steps=spec.max_steps,
            timeout_s=spec.timeout_s,
            on_event=on_event,
            progress_interval_s=PROGRESS_INTERVAL_S,
            max_tool_errors=MAX_TOOL_ERRORS,
            max_tool_calls=spec.budget.max_tool_calls,
            max_total_tokens=spec.budget.max_llm_tokens,
        )
    except BaseException:
        await close_llm(llm)
        raise
    return agent, llm


async def close_llm(llm: Any) -> None:
    """Release the client's HTTP connections; LLMs without ``aclose`` hold nothing to release."""
    close = getattr(llm, "aclose", None)
    if close is not None:
        await close()
