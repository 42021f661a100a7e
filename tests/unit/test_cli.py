"""The command line as a user meets it: a real ``opspawn-mcp`` process, its output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opspawn_mcp.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["serve", "worker", "submit", "status", "servers", "config"])
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
