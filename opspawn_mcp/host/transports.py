"""Opening the official SDK transport for one server config, with secrets resolved only here.

See docs/host.md, "Secrets and logs".
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Self

import anyio
import anyio.abc
import httpx2
from mcp.client._transport import ReadStream, TransportStreams
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.message import SessionMessage

from opspawn_mcp.config import HttpServerConfig, ServerConfig, StdioServerConfig, env_references, expand_env
from opspawn_mcp.errors import Unavailable

stderr_log = logging.getLogger("opspawn_mcp.host.stderr")

_MIN_SECRET_LEN = 4
"""Shorter values are not redacted: replacing every "1" or "on" in a message would garble it."""

HTTP_CONNECT_TIMEOUT_S = 30.0
HTTP_READ_TIMEOUT_S = 300.0
"""An SSE stream may stay quiet for minutes; per-call deadlines come from ``timeout_s`` instead."""


@dataclass
class Secrets:
    """Values that came from ``${VAR}`` references: redacted from anything a person or LLM sees."""

    values: set[str] = field(default_factory=set)

    def expand(self, name: str, text: str) -> str:
        for var in env_references(text):
            if var not in os.environ:
                raise Unavailable(
                    f"MCP server {name!r} needs the environment variable {var}, which is not set. "
                    "Set it in the worker's environment (or fix the server's entry in the config) and retry.",
                    server=name,
                )
            value = os.environ[var]
            if len(value) >= _MIN_SECRET_LEN:
                self.values.add(value)
        return expand_env(text)

    def redact(self, text: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            text = text.replace(value, "***")
        return text


class WatchedReadStream:
    """Wraps a transport's read stream to notice its end: the server exited or the stream dropped.

    The SDK's dispatcher wakes pending requests when the stream ends, but nothing tells the pool;
    without this an idle session whose process died would look ready until the next call failed.
    """

    def __init__(self, inner: ReadStream[SessionMessage | Exception], on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def pump_stderr(name: str, fd: int, secrets: Secrets) -> None:
    """Log a stdio server's stderr, one record per line, until the pipe closes or we are cancelled."""
    os.set_blocking(fd, False)
    buffer = b""

    def emit(raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if text:
            stderr_log.info("[%s] %s", name, secrets.redact(text), extra={"mcp_server": name})

    try:
        while True:
            await anyio.wait_readable(fd)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                stderr_log.warning("[%s] reading stderr failed: %s", name, exc)
                break
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                emit(line)
            if len(buffer) > 65536:
                emit(buffer)
                buffer = b""
    finally:
        if buffer:
            emit(buffer)
        anyio.notify_closing(fd)
        os.close(fd)


def open_transport(
    name: str,
    config: ServerConfig,
    secrets: Secrets,
    tg: anyio.abc.TaskGroup,
    stdio_env: Mapping[str, str] | None = None,
) -> AbstractAsyncContextManager[TransportStreams]:
    """The SDK transport for ``config``; ``tg`` hosts the stderr reader of a stdio server, whose
    environment also gets ``stdio_env`` (the pool's own entries, e.g. ``OPSPAWN_CHAIN``)."""
    if isinstance(config, StdioServerConfig):
        return _stdio(name, config, secrets, tg, stdio_env or {})
    return _http(name, config, secrets)


@asynccontextmanager
async def _stdio(
    name: str,
    config: StdioServerConfig,
    secrets: Secrets,
    tg: anyio.abc.TaskGroup,
    extra_env: Mapping[str, str],
) -> AsyncIterator[TransportStreams]:
    env = {key: secrets.expand(name, value) for key, value in config.env.items()}
    params = StdioServerParameters(
        command=secrets.expand(name, config.command),
        args=[secrets.expand(name, arg) for arg in config.args],
        env={**env, **extra_env} or None,
        cwd=config.cwd,
    )
    read_fd, write_fd = os.pipe()
    errlog = os.fdopen(write_fd, "w")
    tg.start_soon(pump_stderr, name, read_fd, secrets)
    try:
        async with stdio_client(params, errlog=errlog) as streams:
            # The child holds its own copy now; closing ours lets the reader see EOF when it exits.
            errlog.close()
            yield streams
    finally:
        errlog.close()


def _headers(name: str, headers: Iterable[tuple[str, str]], secrets: Secrets) -> dict[str, str]:
    return {key: secrets.expand(name, value) for key, value in headers}


@asynccontextmanager
async def _http(name: str, config: HttpServerConfig, secrets: Secrets) -> AsyncIterator[TransportStreams]:
    url = secrets.expand(name, config.url)
    headers = _headers(name, config.headers.items(), secrets)
    if config.transport == "sse":
        async with sse_client(
            url, headers=headers, timeout=HTTP_CONNECT_TIMEOUT_S, sse_read_timeout=HTTP_READ_TIMEOUT_S
        ) as streams:
            yield streams
        return
    client = create_mcp_http_client(
        headers=headers, timeout=httpx2.Timeout(HTTP_CONNECT_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S)
    )
    async with client, streamable_http_client(url, http_client=client) as streams:
        yield streams
