"""Every malformed message over stdio gets a JSON-RPC error reply, and the server lives on.

A client whose message the server silently drops waits forever, so each case below writes one
bad line to a real ``opspawn-mcp serve --stdio`` process over real pipes, reads the one reply,
checks its code and id (JSON-RPC 2.0: -32700 with id null for what cannot be parsed, -32600 for
valid JSON that is not a valid message, with the id when it is a valid MCP id), and then checks
that a ``ping`` is still answered. The cases share one server process: surviving each message is
part of what is tested.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from opspawn_mcp.stdio import MAX_LINE_BYTES
from tests.support.mcp_wire import initialize_request

READ_GUARD_S = 30.0
"""Per-read deadline: only there to turn a missing reply into a failure, never a timing check."""

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601

INITIALIZE = initialize_request("stdio-security-test", "init")


class StdioServer:
    """``opspawn-mcp serve --stdio`` with an in-memory store and no downstream servers; a
    thread drains stdout into a queue so a read can give up after ``READ_GUARD_S``."""

    def __init__(self, tmp: Path) -> None:
        config = tmp / "opspawn.json"
        config.write_text(json.dumps({"mcpServers": {}, "opspawn": {"store_url": "memory://"}}))
        self._stderr = (tmp / "stderr.log").open("wb")
        self.stderr_path = tmp / "stderr.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opspawn_mcp.cli", "--config", str(config), "serve", "--stdio"],
            cwd=tmp,
            env={**os.environ, "OPSPAWN_STORE_URL": "memory://"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin: IO[bytes] = self.proc.stdin
        self._lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.proc.stdout
        threading.Thread(target=self._drain, args=(stdout,), daemon=True).start()
        self._next_id = 0

    def _drain(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put(b"")  # EOF

    def write(self, line: bytes) -> None:
        self._stdin.write(line + b"\n")
        self._stdin.flush()

    def send(self, message: dict[str, Any]) -> None:
        self.write(json.dumps(message).encode())

    def reply(self) -> dict[str, Any]:
        """The next message that answers something (server notifications are skipped); every
        stdout line must be one JSON-RPC message."""
        while True:
            try:
                line = self._lines.get(timeout=READ_GUARD_S)
            except queue.Empty:
                pytest.fail(f"no reply within {READ_GUARD_S} s; stderr:\n{self.stderr()}")
            if not line:
                pytest.fail(f"the server closed stdout (exit {self.proc.poll()}); stderr:\n{self.stderr()}")
            message = json.loads(line)
            assert isinstance(message, dict), line
            assert message.get("jsonrpc") == "2.0", line
            if "id" in message:
                return message

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": f"r{self._next_id}", "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        answer = self.reply()
        assert answer["id"] == message["id"], answer
        return answer

    def initialize(self) -> None:
        self.send(INITIALIZE)
        answer = self.reply()
        assert answer["id"] == "init" and "result" in answer, answer
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def assert_alive(self) -> None:
        assert self.request("ping") == {"jsonrpc": "2.0", "id": f"r{self._next_id}", "result": {}}

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=READ_GUARD_S)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StdioServer]:
    proc = StdioServer(tmp_path_factory.mktemp("stdio"))
    try:
        proc.initialize()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[StdioServer]:
    proc = StdioServer(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_params(depth: int) -> bytes:
    return (
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":' + b'{"a":' * depth + b"{}" + b"}" * depth + b"}"
    )


# (line, expected code, expected id)
CASES: dict[str, tuple[bytes, int, object]] = {
    "truncated object": (b'{"jsonrpc":"2.0","id":1,"method":"ping"', PARSE_ERROR, None),
    "open brace only": (b"{", PARSE_ERROR, None),
    "ascii garbage": (b"hello, server", PARSE_ERROR, None),
    "binary garbage": (b"\x00\x01\xfe\xff\x80garbage", PARSE_ERROR, None),
    "trailing garbage": (b'{"jsonrpc":"2.0","id":1,"method":"ping"} tail', PARSE_ERROR, None),
    "byte order mark": (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', PARSE_ERROR, None),
    "NaN id": (b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}', PARSE_ERROR, None),
    "lone surrogate escape": (b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}', PARSE_ERROR, None),
    "lone surrogate in params": (
        b'{"jsonrpc":"2.0","id":2,"method":"ping","params":{"x":"a\\udc00b"}}',
        PARSE_ERROR,
        None,
    ),
    "invalid utf-8 in id": (b'{"jsonrpc":"2.0","id":"\xff","method":"ping"}', PARSE_ERROR, None),
    "invalid utf-8 in params": (
        b'{"jsonrpc":"2.0","id":3,"method":"ping","params":{"x":"\xc3\x28"}}',
        PARSE_ERROR,
        None,
    ),
    "100000 nested arrays": (nested(100_000), PARSE_ERROR, None),
    "100000 nested objects in params": (deep_params(100_000), PARSE_ERROR, None),
    "batch": (
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]',
        INVALID_REQUEST,
        None,
    ),
    "empty batch": (b"[]", INVALID_REQUEST, None),
    "scalar number": (b"42", INVALID_REQUEST, None),
    "scalar string": (b'"x"', INVALID_REQUEST, None),
    "scalar null": (b"null", INVALID_REQUEST, None),
    "scalar true": (b"true", INVALID_REQUEST, None),
    "empty object": (b"{}", INVALID_REQUEST, None),
    "jsonrpc missing": (b'{"id":5,"method":"ping"}', INVALID_REQUEST, 5),
    "jsonrpc 1.0": (b'{"jsonrpc":"1.0","id":"v1","method":"ping"}', INVALID_REQUEST, "v1"),
    "jsonrpc a number": (b'{"jsonrpc":2.0,"id":6,"method":"ping"}', INVALID_REQUEST, 6),
    "object id": (b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', INVALID_REQUEST, None),
    "array id": (b'{"jsonrpc":"2.0","id":[1],"method":"ping"}', INVALID_REQUEST, None),
    "boolean id": (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', INVALID_REQUEST, None),
    # MCP ids are strings or integers; JSON-RPC discourages fractions and MCP forbids null.
    "float id": (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', INVALID_REQUEST, None),
    "integral float id": (b'{"jsonrpc":"2.0","id":1.0,"method":"ping"}', INVALID_REQUEST, None),
    "null id": (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', INVALID_REQUEST, None),
    "method missing": (b'{"jsonrpc":"2.0","id":7}', INVALID_REQUEST, 7),
    "method not a string": (b'{"jsonrpc":"2.0","id":8,"method":42}', INVALID_REQUEST, 8),
    "method not a string, no id": (b'{"jsonrpc":"2.0","method":1,"params":"bar"}', INVALID_REQUEST, None),
    "params a string": (b'{"jsonrpc":"2.0","id":9,"method":"ping","params":"x"}', INVALID_REQUEST, 9),
    "params an array": (b'{"jsonrpc":"2.0","id":"p","method":"ping","params":[1]}', INVALID_REQUEST, "p"),
    "params a string, notification": (
        b'{"jsonrpc":"2.0","method":"notifications/initialized","params":"x"}',
        INVALID_REQUEST,
        None,
    ),
    "response with a non-object result": (b'{"jsonrpc":"2.0","id":10,"result":42}', INVALID_REQUEST, 10),
    "response with result and error": (
        b'{"jsonrpc":"2.0","id":11,"result":{},"error":{"code":1,"message":"m"}}',
        INVALID_REQUEST,
        11,
    ),
    "error response without code": (
        b'{"jsonrpc":"2.0","id":12,"error":{"message":"m"}}',
        INVALID_REQUEST,
        12,
    ),
    "line over the size limit": (
        b'{"jsonrpc":"2.0","id":13,"method":"ping","params":{"x":"' + b"a" * MAX_LINE_BYTES + b'"}}',
        INVALID_REQUEST,
        None,
    ),
    "unknown method": (b'{"jsonrpc":"2.0","id":14,"method":"no/such/method"}', METHOD_NOT_FOUND, 14),
}


@pytest.mark.parametrize("line, code, request_id", list(CASES.values()), ids=list(CASES))
def test_malformed_message_gets_an_error_reply(
    server: StdioServer, line: bytes, code: int, request_id: object
) -> None:
    server.write(line)
    answer = server.reply()
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == request_id, answer
    assert answer["error"]["code"] == code, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    assert "result" not in answer
    server.assert_alive()


def test_valid_notifications_and_blank_lines_get_no_reply(server: StdioServer) -> None:
    """Nothing answers them, so the next reply on stdout is the ping's."""
    server.write(b"")
    server.write(b"   \t")
    server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    server.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "gone"}})
    server.send({"jsonrpc": "2.0", "method": "notifications/no-such-notification"})
    server.assert_alive()


def test_many_bad_lines_in_a_row_each_get_one_reply(server: StdioServer) -> None:
    """Written back to back, before reading: one reply per line, in order, then a live server."""
    lines = [case[0] for case in CASES.values() if case[2] is None and len(case[0]) < 1000]
    for line in lines:
        server.write(line)
    for line in lines:
        answer = server.reply()
        assert answer["id"] is None, (line, answer)
        assert answer["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST), (line, answer)
    server.assert_alive()


def test_requests_before_initialize_are_answered(fresh: StdioServer) -> None:
    """Whatever the SDK decides for a request before the handshake, the client hears it."""
    fresh.write(b'{"jsonrpc":"2.0","id":"early","method":"tools/list"}')
    answer = fresh.reply()
    assert answer["id"] == "early" and ("result" in answer or "error" in answer), answer
    fresh.write(b'{"jsonrpc":"2.0","id":"early-bad","params":"x"}')
    answer = fresh.reply()
    assert answer["id"] == "early-bad" and answer["error"]["code"] == INVALID_REQUEST, answer
    fresh.assert_alive()
    fresh.initialize()
    tools = fresh.request("tools/list")
    assert "submit_task" in {tool["name"] for tool in tools["result"]["tools"]}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_while_stdin_stays_open(fresh: StdioServer, signum: int) -> None:
    """The read of stdin is blocked when the signal arrives; it must not hold the shutdown."""
    fresh.initialize()
    fresh.assert_alive()
    fresh.proc.send_signal(signum)
    try:
        code = fresh.proc.wait(timeout=READ_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {READ_GUARD_S} s after the signal; stderr:\n{fresh.stderr()}")
    assert code == 0, fresh.stderr()


def test_closing_stdin_ends_the_server(fresh: StdioServer) -> None:
    fresh.initialize()
    fresh.write(b"{")  # a last bad line is still answered before EOF
    assert fresh.reply()["error"]["code"] == PARSE_ERROR
    assert fresh.proc.stdin is not None
    fresh.proc.stdin.close()
    assert fresh.proc.wait(timeout=READ_GUARD_S) == 0, fresh.stderr()
