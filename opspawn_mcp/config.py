"""opspawn's one config file, its defaults, env overrides and the checks behind ``config check``.

``mcpServers`` in the Claude Desktop shape, the ``opspawn`` object with its ``OPSPAWN_*``
overrides, and secrets as ``${NAME}`` references. See docs/configuration.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_state_path
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentkit.errors import validation_problems
from opspawn_mcp.errors import ConfigError
from opspawn_mcp.models import INSTANCE_ID_PATTERN

CONFIG_ENV = "OPSPAWN_CONFIG"
DEFAULT_CONFIG_NAME = "opspawn.json"
EXAMPLE_SERVER_NAME = "example"
DEFAULTS_SOURCE = "<defaults>"
"""``Config.source`` when no file was read: the embedded default."""
LOCALHOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_GLOB_CHARS = frozenset("*?[")


class ToolFilter(_Strict):
    """Which of a server's tools opspawn shows, to agents and to MCP clients alike (docs/composition.md).

    Entries are tool names or ``fnmatch`` patterns, matched case-sensitively. A tool is shown when
    ``include`` is unset or one of its entries matches, and no ``exclude`` entry matches.
    """

    include: list[str] | None = Field(
        default=None, description="Only these tools (names or patterns); null: every tool."
    )
    exclude: list[str] = Field(default_factory=list, description="Never these tools (names or patterns).")

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for pattern in value:
            if not pattern.strip() or pattern != pattern.strip():
                raise ValueError(f"{pattern!r} is not a tool name or pattern: no blanks around it, not empty")
        if len(set(value)) != len(value):
            raise ValueError("lists a pattern twice")
        return value

    @field_validator("include")
    @classmethod
    def _some_included(cls, value: list[str] | None) -> list[str] | None:
        if value == []:
            raise ValueError(
                '[] would hide every tool; list the tools to keep, e.g. ["read_*"], or remove the key'
            )
        return value

    def hidden_reason(self, tool: str) -> str | None:
        """Why ``tool`` is hidden (the filter entry that hides it), or None when it is shown."""
        if self.include is not None and not any(fnmatchcase(tool, p) for p in self.include):
            return f"not included by {', '.join(repr(p) for p in self.include)}"
        excluded = next((p for p in self.exclude if fnmatchcase(tool, p)), None)
        return None if excluded is None else f"excluded by {excluded!r}"

    def unmatched(self, tools: Iterable[str]) -> list[str]:
        """Entries that match none of ``tools``: usually a typo, or a tool the server renamed."""
        names = list(tools)
        return [
            p for p in [*(self.include or ()), *self.exclude] if not any(fnmatchcase(n, p) for n in names)
        ]

    def static_warnings(self) -> list[str]:
        """What ``config check`` can tell without starting the server: with ``include`` naming
        tools outright, an ``exclude`` entry that matches none of them does nothing."""
        include = self.include
        if include is None or any(_GLOB_CHARS & set(p) for p in include):
            return []
        return [
            f"exclude {p!r} matches none of the included tools"
            for p in self.exclude
            if not any(fnmatchcase(name, p) for name in include)
        ]


class _ServerBase(_Strict):
    timeout_s: float = Field(default=60.0, gt=0, description="Per-call timeout.")
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Calls in flight at once; null: as many as the process runs tasks (worker.concurrency).",
    )
    max_timeouts: int = Field(
        default=2,
        ge=1,
        description="Call timeouts in a row before the server is marked unhealthy and restarted or reconnected.",
    )
    retry: Literal["always", "if_idempotent", "never"] = Field(
        default="if_idempotent",
        description="Whether a call interrupted by a worker crash is run again; if_idempotent: only tools "
        "annotated idempotentHint or readOnlyHint.",
    )
    require_approval: list[str] | Literal["*"] = Field(
        default_factory=list,
        description='Tools a person must approve before an agent calls them, or "*" for all of them; '
        "the task waits as input_required (docs/approvals.md).",
    )
    protocol: Literal["2025-11-25", "auto"] = Field(
        default="2025-11-25",
        description="2025-11-25: the initialize handshake. auto: probe server/discover and speak 2026-07-28 "
        "where the server does, which downstream MCP Tasks need (the server's log and list_changed "
        "notifications are then not received).",
    )
    task_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="Longest a downstream MCP task may run before the pool cancels it (each tasks/get "
        "gets timeout_s).",
    )
    expose: bool = Field(
        default=False,
        description="Also list this server's tools on opspawn's own MCP server, as <server>__<tool>.",
    )
    tools: ToolFilter = Field(
        default_factory=ToolFilter,
        description="Which tools agents and MCP clients see: include/exclude names or fnmatch patterns.",
    )

    @field_validator("require_approval", mode="before")
    @classmethod
    def _approval_list(cls, value: Any) -> Any:
        if value == "*" or (isinstance(value, list) and all(isinstance(t, str) and t.strip() for t in value)):
            return value
        raise ValueError('must be a list of tool names (e.g. ["delete_file"]) or "*" for every tool')

    def needs_approval(self, tool: str) -> bool:
        return self.require_approval == "*" or tool in self.require_approval


class StdioServerConfig(_ServerBase):
    """A downstream server opspawn starts as a child process and speaks to over stdin/stdout."""

    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None

    @property
    def transport(self) -> Literal["stdio"]:
        return "stdio"


class HttpServerConfig(_ServerBase):
    """A downstream server opspawn reaches over SSE or streamable HTTP."""

    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    transport: Literal["sse", "streamable-http"] = "streamable-http"


ServerConfig = StdioServerConfig | HttpServerConfig


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DEFAULT_PROFILE = "default"
LOCAL_PRINCIPAL = "local"


class LlmProfile(_Strict):
    """One named model: where it is, which model, and which env variable holds its key.

    Only the config names endpoints and keys; a client picks a profile by name and may tune
    only ``temperature`` and ``max_tokens`` (``models.ModelSettings``). ``local`` needs no
    network at all.
    """

    provider: Literal["openai", "local"] = "local"
    base_url: str | None = Field(default=None, pattern=r"^https?://")
    model: str | None = None
    api_key_env: str | None = Field(default=None, pattern=_ENV_NAME)
    timeout_s: float = Field(default=120.0, gt=0)


class Limits(_Strict):
    """What one principal may use; unset means unlimited. Submit limits are checked by the
    service (429 / RESOURCE_EXHAUSTED), per-task budgets by the worker."""

    max_in_flight: int | None = Field(
        default=None, ge=1, description="Unfinished tasks at once (queued, running, input_required)."
    )
    submits_per_minute: float | None = Field(default=None, gt=0, description="Token-bucket refill rate.")
    submit_burst: int | None = Field(
        default=None, ge=1, description="Bucket size; default: one minute's worth, at least 1."
    )
    max_task_tokens: int | None = Field(default=None, ge=1, description="LLM tokens one task may use.")
    max_tool_calls: int | None = Field(default=None, ge=1, description="Tool calls one task may make.")
    max_task_seconds: float | None = Field(default=None, gt=0, description="Upper bound of timeout_s.")

    def over(self, base: Limits) -> Limits:
        """These limits with every unset field taken from ``base``."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


class TokenSettings(_Strict):
    """A named bearer token: who the caller is, and what it may use."""

    token_env: str = Field(pattern=_ENV_NAME, description="The env variable holding the token.")
    admin: bool = Field(default=False, description="Sees and cancels every principal's tasks.")
    servers: list[str] | None = Field(default=None, description="Downstream servers allowed; null: all.")
    models: list[str] | None = Field(default=None, description="Model profiles allowed; null: all.")
    limits: Limits = Field(default_factory=Limits)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    auth_token_env: str | None = Field(default=None, pattern=_ENV_NAME)
    tokens: dict[str, TokenSettings] = Field(default_factory=dict)
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port], no path")
        return origins


class WorkerSettings(_Strict):
    concurrency: int = Field(default=8, ge=1, le=1000, description="Agent tasks run at once.")
    lease_ttl_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)
    queue_name: str = Field(
        default="opspawn_tasks",
        pattern=r"^[A-Za-z0-9_.-]{1,200}$",
        description="The RabbitMQ queue serve publishes to and workers consume; one per deployment.",
    )


class StoreSettings(_Strict):
    """The store's connection pool (``opspawn.store``); the URL stays ``opspawn.store_url``.

    A worker's tasks each hold a connection only for one short transaction, so the pool is sized
    to the worker's concurrency (plus a few for heartbeats and recovery) up to a cap that keeps a
    handful of workers inside PostgreSQL's default 100 connections; a checkout that waits longer
    than ``pool_timeout_s`` is an outage (``Unavailable``, retried), not a bug. Connections are
    recycled instead of pinged on every checkout, which would cost a round trip each.
    """

    pool_size: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Connections kept open; default: worker.concurrency + 4, at most 32.",
    )
    pool_timeout_s: float = Field(default=30.0, gt=0, description="Wait for a free connection.")
    pool_recycle_s: float = Field(default=300.0, gt=0, description="Reopen connections this old.")


class ApprovalSettings(_Strict):
    """How long a task waits for a person's approval before the call counts as denied."""

    timeout_s: float = Field(
        default=3600.0, gt=0, le=7 * 24 * 3600, description="Unanswered this long: denied."
    )


class TelemetrySettings(_Strict):
    """Traces, logs (``opspawn.telemetry``); docs/operations.md shows what each produces."""

    otlp_endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="OTLP/HTTP collector base URL (spans go to <url>/v1/traces); unset: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT, and with neither, tracing is off.",
    )
    service_name: str = Field(
        default="opspawn", min_length=1, description="The service.name of every span this process exports."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per line, with the task id while a task runs."
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="opspawn-mcp worker serves its own /metrics here (on server.host, behind the same guard); "
        "unset: no HTTP in workers.",
    )


class ChainingSettings(_Strict):
    """opspawn instances delegating to each other (docs/composition.md, "Chaining")."""

    instance_id: str | None = Field(
        default=None,
        pattern=INSTANCE_ID_PATTERN,
        description="This instance's name in a delegation chain (io.opspawn/chain); unset: derived "
        "from the store, so the processes sharing one store are one instance.",
    )
    max_depth: int = Field(
        default=4,
        ge=0,
        le=32,
        description="How many opspawn instances a goal may have passed through before this one "
        "refuses it; 0 refuses every delegated goal.",
    )


def default_store_url() -> str:
    path = user_state_path("opspawn") / "opspawn.db"
    return f"sqlite+aiosqlite:///{path}"


class OpspawnSettings(_Strict):
    store_url: str = Field(default_factory=default_store_url)
    broker_url: str = Field(
        default="embedded", description="'embedded' (in-process) or an amqp:// RabbitMQ URL."
    )
    llm: LlmProfile = Field(default_factory=LlmProfile)
    models: dict[str, LlmProfile] = Field(default_factory=dict)
    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: Limits = Field(default_factory=Limits)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    chaining: ChainingSettings = Field(default_factory=ChainingSettings)

    @property
    def profiles(self) -> dict[str, LlmProfile]:
        """Every model profile by name: ``opspawn.llm`` is ``default``, then ``opspawn.models``."""
        return {DEFAULT_PROFILE: self.llm, **self.models}

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, url: str) -> str:
        if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://", "memory://")):
            raise ValueError("must start with sqlite+aiosqlite://, postgresql+asyncpg:// or be memory://")
        return url

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        if url != "embedded" and not url.startswith(("amqp://", "amqps://")):
            raise ValueError("must be 'embedded' or an amqp:// RabbitMQ URL")
        return url


class Config(_Strict):
    """The whole file. ``source`` says where it came from, for messages."""

    mcp_servers: dict[str, ServerConfig] = Field(default_factory=dict, alias="mcpServers")
    opspawn: OpspawnSettings = Field(default_factory=OpspawnSettings)
    source: str = Field(default=DEFAULTS_SOURCE, exclude=True)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def example_server_config() -> StdioServerConfig:
    """The downstream server the embedded default attaches, shipped with opspawn itself."""
    return StdioServerConfig(command=sys.executable, args=["-m", "opspawn_mcp.example_server"])


def redact_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs about a store or broker URL."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        return f"{scheme}://{creds}@{host}"
    return url


def env_references(value: str) -> list[str]:
    """The variable names a string's ``${NAME}`` references name, in order: the one reading of the
    syntax, for ``config check`` and for the transports that resolve them."""
    return list(_ENV_REF.findall(value))


def expand_env(value: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` with the variable's value; an unset one raises ``KeyError``."""
    env = os.environ if environ is None else environ
    return _ENV_REF.sub(lambda m: env[m.group(1)], value)


def find_config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """``--config``, then ``$OPSPAWN_CONFIG``, then ``./opspawn.json``; None means defaults."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.is_file() else None


class _BadOverride(Exception):
    """An ``OPSPAWN_*`` variable for a list or object key that is not JSON."""


_JSON_OVERRIDES = frozenset({"allowed_origins", "allowed_hosts", "models", "tokens"})


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``OPSPAWN_*`` variables onto the ``opspawn`` section, as strings pydantic converts."""
    section = dict(raw.get("opspawn") or {})

    def walk(model: type[BaseModel], target: dict[str, Any], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}_{name.upper()}"
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                nested = dict(target.get(name) or {})
                walk(sub, nested, key)
                if nested:
                    target[name] = nested
            elif key in environ:
                text = environ[key]
                try:
                    target[name] = json.loads(text) if name in _JSON_OVERRIDES else text
                except json.JSONDecodeError as exc:
                    raise _BadOverride(f"{key}: not valid JSON ({exc.msg})") from None

    walk(OpspawnSettings, section, "OPSPAWN")
    if section:
        raw = {**raw, "opspawn": section}
    return raw


def _env_problems(config: Config, environ: Mapping[str, str]) -> list[str]:
    problems: list[str] = []

    def check(path: str, text: str) -> None:
        for name in env_references(text):
            if name not in environ:
                problems.append(f"{path}: environment variable {name} is not set")

    for name, server in config.mcp_servers.items():
        if isinstance(server, StdioServerConfig):
            for i, arg in enumerate(server.args):
                check(f"mcpServers.{name}.args[{i}]", arg)
            for key, val in server.env.items():
                check(f"mcpServers.{name}.env.{key}", val)
        else:
            check(f"mcpServers.{name}.url", server.url)
            for key, val in server.headers.items():
                check(f"mcpServers.{name}.headers.{key}", val)
    for name, profile in config.opspawn.profiles.items():
        where = "opspawn.llm" if name == DEFAULT_PROFILE else f"opspawn.models.{name}"
        if profile.api_key_env and profile.api_key_env not in environ:
            problems.append(f"{where}.api_key_env: environment variable {profile.api_key_env} is not set")
    http = config.opspawn.server
    if http.auth_token_env and not environ.get(http.auth_token_env, "").strip():
        problems.append(
            f"opspawn.server.auth_token_env: environment variable {http.auth_token_env} is not set or empty"
        )
    seen: dict[str, str] = {}
    for name, token in http.tokens.items():
        value = environ.get(token.token_env, "").strip()
        if not value:
            problems.append(
                f"opspawn.server.tokens.{name}.token_env: environment variable {token.token_env} is not set or empty"
            )
        elif value in seen:
            problems.append(
                f"opspawn.server.tokens.{name}: holds the same token as tokens.{seen[value]}; "
                "give every principal its own token"
            )
        else:
            seen[value] = name
    return problems


def _reference_problems(config: Config) -> list[str]:
    """Names that must refer to something the config defines: profiles, servers, principals."""
    problems: list[str] = []
    settings = config.opspawn
    if DEFAULT_PROFILE in settings.models:
        problems.append(
            f"opspawn.models.{DEFAULT_PROFILE}: the default profile is opspawn.llm; configure it there"
        )
    for name in settings.models:
        if not re.match(_NAME, name):
            problems.append(f"opspawn.models.{name}: a profile name is 1-64 letters, digits, '_', '-' or '.'")
    server = settings.server
    if server.auth_token_env and server.tokens:
        problems.append(
            "opspawn.server.auth_token_env: use either one token (auth_token_env) or named tokens "
            '(tokens); move it into tokens, e.g. "tokens": {"admin": {"token_env": "'
            f'{server.auth_token_env}", "admin": true}}}}'
        )
    for name, token in server.tokens.items():
        where = f"opspawn.server.tokens.{name}"
        if not re.match(_NAME, name) or name == LOCAL_PRINCIPAL:
            problems.append(
                f"{where}: a principal name is 1-64 letters, digits, '_', '-' or '.', and not "
                f"{LOCAL_PRINCIPAL!r} (the local user over stdio)"
            )
        for server_name in token.servers or ():
            if server_name not in config.mcp_servers:
                problems.append(f"{where}.servers: {server_name!r} is not in mcpServers")
        for profile in token.models or ():
            if profile not in settings.profiles:
                known = ", ".join(settings.profiles)
                problems.append(f"{where}.models: {profile!r} is not a model profile (known: {known})")
    return problems


def parse_config(raw: Any, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Validate a decoded JSON document; raise ``ConfigError`` listing every problem."""
    env = os.environ if environ is None else environ
    if not isinstance(raw, dict):
        raise ConfigError(source, ["(top level): must be a JSON object"])
    problems: list[str] = []
    servers: dict[str, ServerConfig] = {}
    raw_servers = raw.get("mcpServers", {})
    if not isinstance(raw_servers, dict):
        problems.append("mcpServers: must be an object of server name -> server entry")
        raw_servers = {}
    for name, entry in raw_servers.items():
        where = f"mcpServers.{name}"
        if not _SERVER_NAME.match(name):
            problems.append(f"{where}: a server name is 1-64 letters, digits, '_', '-' or '.'")
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        if "url" not in entry and "command" not in entry:
            problems.append(f"{where}: needs either 'command' (stdio) or 'url' (HTTP)")
            continue
        model: type[_ServerBase] = HttpServerConfig if "url" in entry else StdioServerConfig
        try:
            servers[name] = model.model_validate(entry)  # type: ignore[assignment]
        except ValidationError as exc:
            problems += validation_problems(exc, root="(top level)", prefix=where, unknown="unknown key")
    try:
        rest = {k: v for k, v in _env_overrides(raw, env).items() if k != "mcpServers"}
        config = Config.model_validate(rest)
    except ValidationError as exc:
        problems += validation_problems(exc, root="(top level)", unknown="unknown key")
    except _BadOverride as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError(source, problems)
    config.mcp_servers = servers
    problems = _reference_problems(config) + _env_problems(config, env)
    if problems:
        raise ConfigError(source, problems)
    config.source = source
    return config


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the file at ``path``, or the embedded default (the example server) when None."""
    if path is None:
        config = parse_config({}, DEFAULTS_SOURCE, environ)
        config.mcp_servers[EXAMPLE_SERVER_NAME] = example_server_config()
        return config
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            str(path), [f"line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}"]
        ) from None
    return parse_config(raw, str(path), environ)


def describe(config: Config) -> list[str]:
    """What a valid config means, one line per fact, for ``config check``: which servers exist,
    which model profiles clients may pick by name (and where their keys come from), who the
    principals are, and how HTTP is guarded. Names of env variables only, never their values."""
    settings = config.opspawn
    lines = [f"servers: {', '.join(config.mcp_servers) or 'none (agents get no tools)'}"]
    for name, entry in config.mcp_servers.items():
        curation = entry.tools
        if curation.include is not None or curation.exclude:
            shown = "every tool" if curation.include is None else ", ".join(curation.include)
            hidden = f" except {', '.join(curation.exclude)}" if curation.exclude else ""
            lines.append(f"server {name!r}: agents and MCP clients see {shown}{hidden}")
        if entry.require_approval:
            tools = "every tool" if entry.require_approval == "*" else ", ".join(entry.require_approval)
            lines.append(
                f"server {name!r}: a person approves each call of {tools}; unanswered after "
                f"{settings.approvals.timeout_s:g} s it is denied"
            )
    for name, profile in settings.profiles.items():
        if profile.provider == "local":
            where = "the bundled local model"
        else:
            key = f"key from ${profile.api_key_env}" if profile.api_key_env else "no key"
            where = f"{profile.model or '(no model name)'} at {profile.base_url or 'api.openai.com'}, {key}"
        lines.append(f"model profile {name!r}: {where}")
    lines.append(
        "clients choose a model profile by name (model.profile) and may set only temperature and "
        "max_tokens; endpoints and keys come from this file alone"
    )
    server = settings.server
    if server.tokens:
        for name, token in server.tokens.items():
            rights = ["admin: sees every task"] if token.admin else ["sees its own tasks"]
            if token.servers is not None:
                rights.append(f"servers {', '.join(token.servers) or 'none'}")
            if token.models is not None:
                rights.append(f"profiles {', '.join(token.models) or 'none'}")
            limits = token.limits.over(settings.limits).model_dump(exclude_none=True)
            rights += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in limits.items()]
            lines.append(f"principal {name!r} (token in ${token.token_env}): {'; '.join(rights)}")
    elif server.auth_token_env:
        lines.append(f"principal 'default' (token in ${server.auth_token_env}): admin, sees every task")
    else:
        lines.append("no tokens: HTTP serves only loopback, and every caller is the local user")
    lines.append("stdio: the local user, who sees every task")
    chaining = settings.chaining
    named = f"is {chaining.instance_id!r}" if chaining.instance_id else "is named after its store"
    lines.append(
        f"delegation: this instance {named} in io.opspawn/chain; a goal delegated through more than "
        f"{chaining.max_depth} instance(s), or back to this one, is refused (loop_detected)"
    )
    origins = ", ".join(server.allowed_origins) or "none (no CORS)"
    lines.append(f"HTTP on {server.host}:{server.port}; browser origins allowed: {origins}")
    telemetry = settings.telemetry
    traces = (
        f"to {telemetry.otlp_endpoint.rstrip('/')}/v1/traces"
        if telemetry.otlp_endpoint
        else "off unless OTEL_EXPORTER_OTLP_ENDPOINT is set where the process runs"
    )
    lines.append(f"traces: {traces}; logs: {telemetry.log_format}; metrics: GET /metrics (admins)")
    return lines
