"""Turning a stored ``TaskSpec`` into a runnable agentkit ``Agent``, in the worker at run time.

The model profile and its key come from this worker's config, never the task. See docs/workers.md,
"What the actor does" (step 3), and docs/architecture.md, "A setup of its own for the bundled 135M
model".
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection, Mapping
from typing import Any, Protocol

import agentkit
from agentkit.agent import EventCallback
from agentkit.llm import LLM, LocalGGUF, OpenAICompatible, SharedLLM
from agentkit.mcp_proxy import PROXY_TOOL_NAME, McpCaller
from agentkit.mcp_proxy import SEPARATOR as FLAT_SEPARATOR
from opspawn_mcp.chaining import instance_id, outgoing_meta
from opspawn_mcp.config import DEFAULT_PROFILE, Config, LlmProfile
from opspawn_mcp.models import ModelSettings, TaskSpec
from opspawn_mcp.telemetry.hooks import ObservedLLM


class TaskCaller(McpCaller, Protocol):
    """One task's view of the downstream pool (``host.pool.ScopedCaller``): agentkit's caller,
    plus whether a call cut short by a dead worker may run again."""

    def may_rerun(self, server: str, tool: str) -> bool: ...


class ToolPool(Protocol):
    """The process's downstream MCP pool (``host.pool.OpsMcpClient``) as the agent needs it."""

    def scoped(
        self, allowed: Collection[str] | None, *, meta: Mapping[str, Any] | None = None
    ) -> TaskCaller: ...


class AgentSetupError(Exception):
    """The task cannot start as specified; ``str(exc)`` tells a human what to change."""


def profile_name(settings: ModelSettings) -> str:
    """The profile a task runs on: the name the service resolved at submit time (a spec built in
    code may name none: the default)."""
    return settings.profile or DEFAULT_PROFILE


def profile_for(settings: ModelSettings, config: Config) -> LlmProfile:
    """The config's profile the task chose, as this worker's config defines it."""
    name = profile_name(settings)
    profile = config.opspawn.profiles.get(name)
    if profile is None:
        raise AgentSetupError(
            f"The task asks for model profile {name!r}, which this worker's config does not define "
            f"(it has: {', '.join(config.opspawn.profiles)}); add it to opspawn.models or resubmit."
        )
    return profile


class LlmClients:
    """One model client per profile per process, shared by every task the process runs.

    A client holds an HTTP connection pool (and, for the bundled model, the loaded weights), so
    building one per task cost a TLS context and a model load each time, and a process with
    1,000 tasks in flight held 1,000 pools. A task gets a view of the shared client tuned with
    its own ``temperature``/``max_tokens`` (``with_settings``), which shares the connections.
    Keys are read from the variable *the profile* names, in this process's environment, when
    the profile's client is first built; never from a task.
    """

    def __init__(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        self._config = config
        self._environ = os.environ if environ is None else environ
        self._clients: dict[str, SharedLLM] = {}
        self._lock = asyncio.Lock()

    async def get(self, settings: ModelSettings) -> LLM:
        """The client for the task's profile, tuned by its settings; ``AgentSetupError`` with a fix."""
        name = profile_name(settings)
        async with self._lock:
            shared = self._clients.get(name)
            if shared is None:
                shared = await open_llm(profile_for(settings, self._config), self._environ)
                self._clients[name] = shared
        if settings.temperature is None and settings.max_tokens is None:
            return shared
        return shared.with_settings(temperature=settings.temperature, max_tokens=settings.max_tokens)

    async def aclose(self) -> None:
        """Close every shared client (their HTTP connections); at process shutdown."""
        clients, self._clients = list(self._clients.values()), {}
        for llm in clients:
            await llm.aclose()


async def open_llm(profile: LlmProfile, environ: Mapping[str, str]) -> SharedLLM:
    """The shared client of one profile; raises ``AgentSetupError`` with a fix."""
    if profile.provider == "local":
        try:
            local = LocalGGUF()
            await local.load()
        except Exception as exc:
            raise AgentSetupError(
                f"The local model cannot be loaded ({exc}); install opspawn[local-llm] on the worker "
                "or configure a profile with provider 'openai'."
            ) from exc
        return local
    if not profile.model:
        raise AgentSetupError("The model profile has no model name: set its 'model' in the config.")
    api_key: str | None = None
    if profile.api_key_env:
        api_key = environ.get(profile.api_key_env)
        if not api_key:
            raise AgentSetupError(
                f"The model profile's api_key_env names {profile.api_key_env}, which is not set in the "
                "worker's environment; export it where the worker runs."
            )
    try:
        return OpenAICompatible(
            base_url=profile.base_url, api_key=api_key, model=profile.model, timeout_s=profile.timeout_s
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


async def build_tools(caller: McpCaller, servers: list[str], *, proxy: bool = True) -> agentkit.ToolRegistry:
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


def call_target(call: agentkit.ToolCall) -> tuple[str, str, dict[str, Any]] | None:
    """The downstream server, tool and arguments a call reaches: a flat tool is ``server__tool``,
    the proxy names them in its arguments. None when the call names no downstream tool."""
    if call.name == PROXY_TOOL_NAME:
        server, name = call.arguments.get("server"), call.arguments.get("tool")
        arguments = call.arguments.get("arguments")
    else:
        server, _, name = call.name.partition(FLAT_SEPARATOR)
        arguments = call.arguments
    if not isinstance(server, str) or not isinstance(name, str) or not server or not name:
        return None
    return server, name, dict(arguments) if isinstance(arguments, dict) else {}


def rerun_policy(caller: TaskCaller) -> agentkit.RerunPolicy:
    """Whether a downstream call that was in flight when a worker died runs again: only if its
    server's ``retry`` setting and the tool's MCP annotations allow it (``may_rerun``)."""

    def decide(call: agentkit.ToolCall, tool: agentkit.Tool | None) -> bool:
        target = call_target(call)
        return target is not None and caller.may_rerun(target[0], target[1])

    return decide


def approval_policy(config: Config) -> agentkit.ApprovalPolicy | None:
    """Which calls a person must approve first: ``mcpServers.X.require_approval``; None if no
    server asks for any, so the agent checks nothing."""
    gated = {name: entry for name, entry in config.mcp_servers.items() if entry.require_approval}
    if not gated:
        return None

    def decide(call: agentkit.ToolCall, tool: agentkit.Tool | None) -> bool:
        target = call_target(call)
        entry = gated.get(target[0]) if target is not None else None
        return target is not None and entry is not None and entry.needs_approval(target[1])

    return decide


async def build_agent(
    spec: TaskSpec, config: Config, pool: ToolPool, on_event: EventCallback, llms: LlmClients
) -> agentkit.Agent:
    """The agent for one task, on the process's shared model client of its profile (each call
    counted and traced: ``ObservedLLM``)."""
    profile = profile_for(spec.model, config)
    llm = ObservedLLM(await llms.get(spec.model), profile_name(spec.model), profile.model)
    servers = list(spec.servers) if spec.servers is not None else list(config.mcp_servers)
    # Every downstream call carries the task's delegation chain with this instance appended, so
    # an opspawn downstream refuses a goal that would loop (opspawn_mcp.chaining).
    caller = pool.scoped(servers, meta=outgoing_meta(spec.chain, instance_id(config)))
    small = profile.provider == "local"
    tools = await build_tools(caller, servers, proxy=not small)
    planner: str | agentkit.Planner = spec.planner
    system_prompt = spec.system_prompt
    if small:
        planner = small_model_planner() if spec.planner == "react" else spec.planner
        system_prompt = SMALL_MODEL_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return agentkit.Agent(
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
        rerun_interrupted=rerun_policy(caller),
        require_approval=approval_policy(config),
    )
