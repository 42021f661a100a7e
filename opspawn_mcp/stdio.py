"""MCP over stdio, with every malformed line answered.

``serve_stdio`` keeps the SDK's transport and session and screens each line before the SDK's
reader sees it. See docs/mcp-server.md, "Malformed messages over stdio".
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any, Final, cast

import anyio
import pydantic_core
from mcp.server import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared.message import SessionMessage
from mcp_types import (
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    RequestId,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError

log = logging.getLogger("opspawn_mcp.stdio")

MAX_LINE_BYTES: Final = DEFAULT_MAX_REQUEST_BODY_SIZE
"""One message's limit, the same as the SDK's HTTP body limit, so a line without a newline
cannot grow the process without bound."""

Reply = Callable[[SessionMessage], Awaitable[None]]


async def serve_stdio(server: MCPServer) -> None:
    """``MCPServer.run_stdio_async`` with the screened reader: serve until stdin closes.

    Cancelling this coroutine returns at once even while a read is blocked (the read runs in a
    daemon thread that is left behind), which is what lets a signal stop the server.
    """
    lowlevel = server._lowlevel_server  # no public accessor; run_stdio_async uses the same
    with _claim_stdin() as raw:
        lines = ScreenedLines(raw)
        async with stdio_server(stdin=cast("anyio.AsyncFile[str]", lines)) as (read_stream, write_stream):
            lines.reply_with(write_stream.send)
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


class ScreenedLines:
    """The lines of ``raw`` that are valid MCP messages, as the SDK's reader iterates stdin.

    Not an ``anyio.AsyncFile``: the SDK only iterates its ``stdin``, and anything else it might
    call one day should fail loudly rather than read past the screen.
    """

    def __init__(self, raw: IO[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._raw = raw
        self._max = max_line_bytes
        self._reply: Reply | None = None
        self._ready = anyio.Event()

    def reply_with(self, send: Reply) -> None:
        """Bind the session's write stream; error replies wait for it (it exists only once the
        SDK transport has started, while reading may already have begun)."""
        self._reply = send
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            line, overlong = await _in_daemon_thread(self._read_line)
            if not line:
                return
            verdict = _invalid(None, f"message over {self._max} bytes") if overlong else screen(line)
            if isinstance(verdict, str):
                yield verdict
            elif verdict is not None and not await self._send_error(verdict):
                return

    def _read_line(self) -> tuple[bytes, bool]:
        """One line, or its first ``max`` bytes and ``True`` with the rest discarded."""
        line = self._raw.readline(self._max + 1)
        if len(line) <= self._max or line.endswith(b"\n"):
            return line, False
        rest = line
        while rest and not rest.endswith(b"\n"):
            rest = self._raw.readline(self._max)
        return line[: self._max], True

    async def _send_error(self, error: JSONRPCError) -> bool:
        """Write one error reply; False once the session's write side is gone."""
        await self._ready.wait()
        assert self._reply is not None
        log.warning("answered a malformed message: %s", error.error.message)
        try:
            await self._reply(SessionMessage(error))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True


def screen(line: bytes) -> str | JSONRPCError | None:
    """The line as text if the SDK can take it, the error reply if not, None for a blank line.

    Parses with the SDK's own parser (pydantic-core) so "valid" means the same here as there,
    then validates with the SDK's adapter: a line passed on is one the session will handle.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _error(None, PARSE_ERROR, f"Parse error: not UTF-8 ({exc.reason} at byte {exc.start})")
    if not text.strip():
        return None
    try:
        raw = pydantic_core.from_json(text, allow_inf_nan=False)
    except ValueError as exc:
        return _error(None, PARSE_ERROR, f"Parse error: {exc}")
    if isinstance(raw, list):
        what = "an empty batch" if not raw else "a batch"
        return _invalid(None, f"{what}; batches are not supported, send one JSON-RPC object per line")
    if not isinstance(raw, dict):
        return _invalid(None, f"a message must be a JSON object, not {type(raw).__name__}")
    request_id = raw.get("id")
    reply_id = request_id if _is_request_id(request_id) else None
    problem = _envelope_problem(raw)
    if problem is not None:
        return _invalid(reply_id, problem)
    try:
        message = jsonrpc_message_adapter.validate_json(text, by_name=False)
    except ValidationError as exc:
        return _invalid(reply_id, f"not a valid JSON-RPC message ({exc.error_count()} errors)")
    kind = JSONRPCRequest if "id" in raw else JSONRPCNotification
    if "method" in raw and not isinstance(message, kind):  # the id must not be lost
        return _invalid(reply_id, "not a valid JSON-RPC request")
    return text


def _envelope_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with a decoded object as a JSON-RPC 2.0 / MCP message, if anything."""
    if raw.get("jsonrpc") != "2.0":
        return '"jsonrpc" must be "2.0"'
    if "method" in raw:
        if not isinstance(raw["method"], str):
            return '"method" must be a string'
        if "id" in raw and not _is_request_id(raw["id"]):
            return '"id" must be a string or an integer'
        if raw.get("params") is not None and not isinstance(raw["params"], dict):
            return '"params" must be an object'
        return None
    if "result" in raw and "error" in raw:
        return 'a response has "result" or "error", not both'
    if "result" in raw or "error" in raw:
        return None  # a response; the SDK's adapter checks the rest
    return '"method" is missing'


def _is_request_id(value: object) -> bool:
    """MCP ids are strings or integers (JSON-RPC allows null and fractions; MCP does not)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _invalid(request_id: RequestId | None, why: str) -> JSONRPCError:
    return _error(request_id, INVALID_REQUEST, f"Invalid Request: {why}")


def _error(request_id: RequestId | None, code: int, message: str) -> JSONRPCError:
    # id is passed explicitly: the SDK writes with exclude_unset, and "id": null must be written.
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message))


async def _in_daemon_thread(fn: Callable[[], tuple[bytes, bool]]) -> tuple[bytes, bool]:
    """Run a blocking read in a daemon thread and await it, abandoning it on cancel.

    anyio's worker threads are not cancellable and not daemons: a read blocked on stdin held
    shutdown until the client wrote or closed. A daemon thread is dropped at exit instead.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[bytes, bool]] = loop.create_future()

    def settle(result: tuple[bytes, bool] | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            assert result is not None
            done.set_result(result)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="opspawn-stdin", daemon=True).start()
    return await done


@contextmanager
def _claim_stdin() -> Iterator[IO[bytes]]:
    """A private duplicate of fd 0 to read, with fd 0 pointed at the null device meanwhile.

    What the SDK does for the stdin it opens itself (it skips it for a stdin passed in): a
    handler or child process that reads fd 0 gets EOF instead of stealing protocol bytes. The
    duplicate is never closed, because an abandoned read may still block on it.
    """
    stdin = sys.stdin
    if stdin is None:
        raise RuntimeError("serve --stdio needs a stdin")
    try:
        backed_by_fd_0 = stdin.buffer.fileno() == 0
    except (AttributeError, OSError, ValueError):
        backed_by_fd_0 = False
    if not backed_by_fd_0 or sys.platform == "win32":
        yield stdin.buffer
        return
    import fcntl

    private = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
    finally:
        os.close(null)
    try:
        yield os.fdopen(private, "rb", closefd=False)
    finally:
        os.dup2(private, 0)
