"""opspawn's one config file, its defaults, env overrides and the checks behind ``config check``.

The file is JSON. ``mcpServers`` has the Claude Desktop shape, so an existing assistant config can
be pointed at opspawn unchanged; the ``opspawn`` object holds everything else. Every key under
``opspawn`` can be overridden by an environment variable named ``OPSPAWN_`` + its path in upper
case joined by ``_``: ``opspawn.store_url`` -> ``OPSPAWN_STORE_URL``, ``opspawn.llm.model`` ->
``OPSPAWN_LLM_MODEL``, ``opspawn.server.port`` -> ``OPSPAWN_SERVER_PORT``.

Secrets are references: ``${NAME}`` inside a server's ``env``, ``headers`` or ``args`` and the
``*_env`` keys name environment variables; values are read when a connection is opened and are
never written back to the store, the logs or an answer. An unset variable is a config problem,
so a bad config is refused before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_state_path
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from opspawn_mcp.errors import ConfigError

CONFIG_ENV = "OPSPAWN_CONFIG"
DEFAULT_CONFIG_NAME = "opspawn.json"
EXAMPLE_SERVER_NAME = "example"
LOCALHOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ServerBase(_Strict):
    timeout_s: float = Field(default=60.0, gt=0, description="Per-call timeout.")
    max_concurrency: int = Field(default=16, ge=1, description="Calls in flight at once.")


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


class LlmDefaults(_Strict):
    """The model a task gets when its spec names none. ``local`` needs no network at all."""

    provider: Literal["openai", "local"] = "local"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(default=120.0, gt=0)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    auth_token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    allowed_origins: list[str] = Field(default_factory=list)


class WorkerSettings(_Strict):
    concurrency: int = Field(default=8, ge=1, le=1000, description="Agent tasks run at once.")
    lease_ttl_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)
    queue_name: str = Field(
        default="opspawn_tasks",
        pattern=r"^[A-Za-z0-9_.-]{1,200}$",
        description="The RabbitMQ queue serve publishes to and workers consume; one per deployment.",
    )


def default_store_url() -> str:
    path = user_state_path("opspawn") / "opspawn.db"
    return f"sqlite+aiosqlite:///{path}"


class OpspawnSettings(_Strict):
    store_url: str = Field(default_factory=default_store_url)
    broker_url: str = Field(
        default="embedded", description="'embedded' (in-process) or an amqp:// RabbitMQ URL."
    )
    llm: LlmDefaults = Field(default_factory=LlmDefaults)
    server: ServerSettings = Field(default_factory=ServerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)

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
    source: str = Field(default="<defaults>", exclude=True)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def server(self, name: str) -> ServerConfig:
        return self.mcp_servers[name]


def example_server_config() -> StdioServerConfig:
    """The downstream server the embedded default attaches, shipped with opspawn itself."""
    return StdioServerConfig(command=sys.executable, args=["-m", "opspawn_mcp.example_server"])


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


def _problems(exc: ValidationError, prefix: str) -> list[str]:
    out = []
    for err in exc.errors():
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{_format_loc(prefix, tuple(err['loc']))}: {msg.removeprefix('Value error, ')}")
    return out


def _format_loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    parts: list[str] = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


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
                target[name] = json.loads(text) if name == "allowed_origins" else text

    walk(OpspawnSettings, section, "OPSPAWN")
    if section:
        raw = {**raw, "opspawn": section}
    return raw


def _env_problems(config: Config, environ: Mapping[str, str]) -> list[str]:
    problems: list[str] = []

    def check(path: str, text: str) -> None:
        for name in _ENV_REF.findall(text):
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
    llm = config.opspawn.llm
    if llm.api_key_env and llm.api_key_env not in environ:
        problems.append(f"opspawn.llm.api_key_env: environment variable {llm.api_key_env} is not set")
    auth = config.opspawn.server.auth_token_env
    if auth and auth not in environ:
        problems.append(f"opspawn.server.auth_token_env: environment variable {auth} is not set")
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
            problems += _problems(exc, where)
    rest = {k: v for k, v in _env_overrides(raw, env).items() if k != "mcpServers"}
    try:
        config = Config.model_validate(rest)
    except (ValidationError, json.JSONDecodeError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            problems.append(f"opspawn.server.allowed_origins: override is not valid JSON: {exc}")
        else:
            problems += _problems(exc, "")
    if problems:
        raise ConfigError(source, problems)
    config.mcp_servers = servers
    problems = _env_problems(config, env)
    if problems:
        raise ConfigError(source, problems)
    config.source = source
    return config


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the file at ``path``, or the embedded default (the example server) when None."""
    if path is None:
        config = parse_config({}, "<defaults>", environ)
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
