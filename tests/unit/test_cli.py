"""The command line as a user meets it: a real ``opspawn-mcp`` process, its output and exit code."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from opspawn_mcp.remote import Remote, Unreachable, reason


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opspawn_mcp.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "command", ["serve", "worker", "submit", "status", "tasks", "cancel", "approve", "servers", "config"]
)
def test_every_command_explains_itself(command: str) -> None:
    out = run_cli(command, "--help")
    assert out.returncode == 0
    assert "usage: opspawn-mcp" in out.stdout and len(out.stdout.splitlines()) > 3


def test_config_check_lists_each_problem_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mcpServers": {"x": {}}, "opspawn": {"port": 1}}))
    out = run_cli("config", "check", str(bad))
    assert out.returncode == 2
    assert "mcpServers.x: needs either 'command' (stdio) or 'url' (HTTP)" in out.stderr
    assert "opspawn.port: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"mcpServers": {"time": {"command": "mcp-server-time"}}}))
    out = run_cli("config", "check", str(good))
    assert out.returncode == 0, out.stderr
    assert "OK (1 server(s): time)" in out.stdout


def test_config_check_warns_of_no_servers_and_of_the_example_server_left_out(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"opspawn": {"server": {"port": 9000}}}))
    out = run_cli("config", "check", str(empty))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == (
        "  warning: no downstream MCP servers: agents get no tools and answer from the model alone"
    )
    example = json.dumps({"command": sys.executable, "args": ["-m", "opspawn_mcp.example_server"]})
    assert lines[2] == (
        "  note: the bundled example server is not attached (a config file's mcpServers replace the "
        f'embedded default); to keep it, add "example": {example} to mcpServers'
    )


def test_serve_says_it_too_when_agents_get_no_tools(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    db = tmp_path / "o.db"
    empty.write_text(json.dumps({"opspawn": {"store_url": f"sqlite+aiosqlite:///{db}"}}))
    out = subprocess.run(
        [sys.executable, "-m", "opspawn_mcp.cli", "serve", "--stdio", "--config", str(empty)],
        input="",  # the client hangs up at once: serve starts, warns, and ends
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stdout == "", out.stderr
    assert "no downstream MCP servers: agents get no tools and answer from the model alone" in out.stderr
    assert "the bundled example server is not attached" in out.stderr


def test_the_embedded_default_needs_no_warning(tmp_path: Path) -> None:
    env = {"OPSPAWN_CONFIG": "", "XDG_STATE_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "opspawn_mcp.cli", "config", "check"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "OK (1 server(s): example)" in out.stdout
    assert "warning" not in out.stdout and "note:" not in out.stdout


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_port_that_is_not_one_with_a_usage_line(port: str) -> None:
    out = run_cli("serve", f"--port={port}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"opspawn-mcp serve: error: argument --port: {port!r} is not a port number (0-65535; 0 picks a free one)"
    )


def test_a_port_in_use_is_one_line_naming_the_option_and_the_variable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"OPSPAWN_CONFIG": "", "XDG_STATE_HOME": str(tmp_path)}
        out = run_cli("serve", "--port", str(port), env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"opspawn-mcp: Cannot listen on 127.0.0.1:{port}: Address already in use. Pick another port "
        "with `serve --port P` (or opspawn.server.port, $OPSPAWN_SERVER_PORT), or stop what is using this one."
    )


def test_version_and_config_after_the_command(tmp_path: Path) -> None:
    assert run_cli("--version").stdout.startswith("opspawn-mcp 0.")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"mcpServers": {"time": {"command": "mcp-server-time"}}}))
    out = run_cli("config", "show", "--config", str(good))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mcpServers"]["time"]["command"] == "mcp-server-time"


def test_config_show_never_prints_secret_values(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"mcpServers": {"gh": {"command": "x", "env": {"T": "${GH_TOKEN}"}}}}))
    out = run_cli("--config", str(path), "config", "show", env={"GH_TOKEN": "value-that-must-not-leak"})
    assert out.returncode == 0, out.stderr
    assert "${GH_TOKEN}" in out.stdout and "value-that-must-not-leak" not in out.stdout


def test_a_missing_config_file_is_a_clear_error() -> None:
    out = run_cli("--config", "/nonexistent/opspawn.json", "config", "check")
    assert out.returncode == 2
    assert "cannot read the file" in out.stderr and "Traceback" not in out.stderr


# -- talking to a server: one line naming the real cause ----------------------------------------


@contextmanager
def broken_server(answer: bytes | None) -> Iterator[str]:
    """A TCP server that reads each request, then sends ``answer`` and closes (``None``: never
    answers, holding the connection until the test ends). Stands in for a server that crashed
    mid-request, hangs, or is not an MCP server."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            if answer is None:
                held.append(conn)
                continue
            conn.sendall(answer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/mcp"
    finally:
        done.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        listener.close()
        for conn in held:
            conn.close()
        thread.join()


def call(url: str, timeout_s: float = 60.0) -> str:
    with pytest.raises(Unreachable) as caught:
        asyncio.run(Remote(url, None).call("list_servers", {}, timeout_s=timeout_s))
    message = str(caught.value)
    assert "\n" not in message and "TaskGroup" not in message and "sub-exception" not in message
    return message


def test_a_server_that_dies_mid_request_is_named_as_such() -> None:
    with broken_server(b"") as url:
        assert call(url) == (
            f"the opspawn server at {url} closed the connection before answering: it stopped or "
            "crashed; check its log"
        )


def test_a_server_that_never_answers_is_a_timeout_with_its_length() -> None:
    with broken_server(None) as url:
        assert call(url, timeout_s=0.5) == f"the opspawn server at {url} did not answer within 0.5 s"


def test_something_else_on_the_port_names_the_underlying_error() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc"
    with broken_server(reply) as url:
        message = call(url)
    assert message.startswith(f"could not talk to the opspawn server at {url}: MCPError: ")
    assert "text/plain" in message


def test_exception_groups_are_unwrapped_to_the_first_real_error() -> None:
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [ValueError("the real cause")])])
    assert reason("http://x/mcp", nested) == (
        "could not talk to the opspawn server at http://x/mcp: ValueError: the real cause"
    )


def test_no_server_at_all_is_one_line_from_every_client_command() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"  # bound, never listening
        for args in (
            ["submit", "hi", "--wait", "5"],
            ["status", "t1"],
            ["status", "t1", "--follow"],
            ["tasks"],
            ["cancel", "t1"],
            ["approve", "t1", "--request", "r1", "--deny"],
            ["servers"],
        ):
            out = run_cli(*args, "--url", url)
            assert out.returncode == 2
            assert (
                out.stderr == f"opspawn-mcp: no opspawn server at {url}: start one with `opspawn-mcp serve`\n"
            )
