"""``opspawn-mcp serve`` as a real subprocess for end-to-end tests: its config and its process.

The config has the testing MCP server as its one downstream server, a SQLite store beside the
config file and the fake OpenAI server (``tests.support.fake_openai``) as its LLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.servers.harness import REPO_ROOT, opspawn_command


def deployment_env(**extra: str) -> dict[str, str]:
    """The environment of a real deployment, plus ``extra``: no ``OPSPAWN_*``/``OPENAI_*``
    override from the developer's shell may change the config under test."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPSPAWN_", "OPENAI_"))}
    return {**base, **extra}


def fake_llm_profile(base_url: str, *, timeout_s: float = 30) -> dict[str, Any]:
    """The fake OpenAI server at ``base_url`` as an ``opspawn.llm`` model profile."""
    return {"provider": "openai", "base_url": base_url, "model": "fake-model", "timeout_s": timeout_s}


def write_config(path: Path, llm_url: str, **server: Any) -> Path:
    config = {
        "mcpServers": {
            "testing": {
                "command": sys.executable,
                "args": ["-m", "tests.servers.testing_server", "--transport", "stdio"],
                "cwd": str(REPO_ROOT),
            }
        },
        "opspawn": {
            "store_url": f"sqlite+aiosqlite:///{path.parent / 'opspawn.db'}",
            "llm": {"provider": "openai", "base_url": llm_url, "model": "fake"},
            "server": server,
        },
    }
    path.write_text(json.dumps(config))
    return path


class ServerProcess:
    """``opspawn-mcp serve`` over HTTP; stderr goes to a file so a chatty log never blocks it."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = config.parent / "serve.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [opspawn_command(), "--config", str(config), "serve", "--port", "0", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env={**os.environ, **(env or {})},
        )
        self.base = self._wait_for_address()
        self.url = f"{self.base}/mcp"

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if line.startswith("opspawn: serving MCP at "):
                    return line.split()[4].removesuffix("/mcp")
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"opspawn-mcp serve did not start:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log_file.close()
        return code
