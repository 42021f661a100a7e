"""The client commands as a user meets them: the real ``opspawn-mcp`` entry point in its own
process, against one real ``opspawn-mcp serve`` (embedded worker, SQLite, the bundled example MCP
server, the scripted fake OpenAI-compatible LLM in its own process), checked by output and exit code.

The fake LLM's rules (tests/support/fake_openai.py) make the tasks deterministic: ``echo X`` calls
the example server's echo tool and answers ``done: X``; ``sleep N`` calls its sleep tool.
A pseudo-terminal run checks the rich view; every other run is plain text (stdout is a pipe).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.security.kit import Serve, run_serve, write_serve_config
from tests.servers.harness import HANG_GUARD_S, REPO_ROOT, free_port, opspawn_command, opspawn_process
from tests.support.fake_openai import spawn_fake_openai, wait_for_http
from tests.support.serve import deployment_env, fake_llm_profile
from tests.support.services import require_command

CLI_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("cli")
    with spawn_fake_openai() as llm_url, run_serve(tmp, {"llm": fake_llm_profile(llm_url)}) as running:
        yield running


def cli_env(serve: Serve) -> dict[str, str]:
    """A user's shell pointed at ``serve`` by ``$OPSPAWN_URL``."""
    return deployment_env(OPSPAWN_URL=serve.mcp)


def cli(serve: Serve, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [opspawn_command(), *args],
        cwd=REPO_ROOT,
        env=cli_env(serve),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def submitted(serve: Serve, goal: str, *args: str) -> str:
    out = cli(serve, "submit", goal, "--json", *args)
    assert out.returncode == 0, out.stderr
    task_id: str = json.loads(out.stdout)["task_id"]
    return task_id


def on_a_terminal(serve: Serve, *args: str) -> str:
    """``opspawn-mcp *args`` with stdout on a pseudo-terminal (what a user's shell gives it)."""
    leader, follower = pty.openpty()
    env = {**cli_env(serve), "TERM": "xterm-256color", "COLUMNS": "160"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [opspawn_command(), *args], cwd=REPO_ROOT, env=env, stdout=follower, stderr=subprocess.PIPE
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + CLI_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=HANG_GUARD_S) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    return b"".join(chunks).decode(errors="replace")


# -- the commands -----------------------------------------------------------------------------


def test_version_names_the_installed_package(serve: Serve) -> None:
    out = cli(serve, "--version")
    assert out.returncode == 0 and out.stdout.startswith("opspawn-mcp 0.")


def test_tasks_is_a_table_of_id_status_goal_age_steps_and_tokens(serve: Serve) -> None:
    task_id = submitted(serve, "echo table row", "--wait", "60")
    out = cli(serve, "tasks")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "GOAL", "AGE", "STEPS", "TOKENS"]
    row = next(r for r in rows if r.startswith(task_id))
    cells = row.split()
    assert cells[1] == "completed" and "echo table row" in row
    assert int(cells[-2]) >= 2 and int(cells[-1]) > 0  # steps, tokens
    assert "\x1b[" not in out.stdout  # plain text when stdout is not a terminal


def test_tasks_filters_by_status_text_and_limit(serve: Serve) -> None:
    wanted = submitted(serve, "echo needle-7f3", "--wait", "60")
    submitted(serve, "echo haystack", "--wait", "60")
    by_text = json.loads(cli(serve, "tasks", "NEEDLE-7f3", "--json").stdout)["tasks"]
    assert [t["task_id"] for t in by_text] == [wanted]
    failed = json.loads(cli(serve, "tasks", "--status", "failed", "--json").stdout)["tasks"]
    assert all(t["status"] == "failed" for t in failed) and wanted not in {t["task_id"] for t in failed}
    assert len(json.loads(cli(serve, "tasks", "--limit", "1", "--json").stdout)["tasks"]) == 1


def test_status_follow_shows_the_tool_call_and_exits_0_when_completed(serve: Serve) -> None:
    task_id = submitted(serve, "echo followed")
    out = cli(serve, "status", "--follow", task_id)
    assert out.returncode == 0, out.stderr
    assert "tool_call    example__echo" in out.stdout
    assert "tool_result  example__echo: followed" in out.stdout
    assert "state        completed" in out.stdout
    assert re.search(r"^result +done: followed$", out.stdout, re.M)


def test_follow_exits_1_when_the_task_fails(serve: Serve) -> None:
    task_id = submitted(serve, "sleep 25", "--timeout", "1")
    out = cli(serve, "status", task_id, "--follow")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"^status +failed$", out.stdout, re.M) and "timeout_s=1" in out.stdout


def test_cancel_stops_a_task_and_follow_exits_3(serve: Serve) -> None:
    task_id = submitted(serve, "sleep 25")
    cancelled = cli(serve, "cancel", task_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert re.search(r"^status +cancelled$", cancelled.stdout, re.M)
    followed = cli(serve, "status", "--follow", task_id, "--json")
    assert followed.returncode == 3
    assert json.loads(followed.stdout.splitlines()[-1])["status"] == "cancelled"


def test_a_tool_error_answer_is_completed_with_a_warning_in_status_tasks_and_follow(serve: Serve) -> None:
    # The example server refuses sleep(99999); the fake model then answers with the error's text.
    followed = cli(serve, "submit", "sleep 99999", "--follow")
    assert followed.returncode == 0, followed.stderr
    warning = (
        "the agent finished without a successful tool result (last tool error: example__sleep: "
        "The tool example/sleep reported an error: Error executing tool sleep: seconds must be at most 30"
    )
    assert re.search(r"^status +completed$", followed.stdout, re.M)
    assert re.search(rf"^warning +{re.escape(warning)}", followed.stdout, re.M), followed.stdout
    task_id = re.search(r"^task +(\S+)$", followed.stdout, re.M).group(1)  # type: ignore[union-attr]
    shown = cli(serve, "status", task_id)
    assert re.search(rf"^warning +{re.escape(warning)}", shown.stdout, re.M), shown.stdout
    row = next(r for r in cli(serve, "tasks", task_id).stdout.splitlines() if r.startswith(task_id))
    assert row.split()[1:3] == ["completed", "(warning)"]


def test_every_read_command_speaks_json(serve: Serve) -> None:
    task_id = submitted(serve, "echo as json", "--wait", "60")
    assert json.loads(cli(serve, "status", task_id, "--json").stdout)["status"] == "completed"
    assert {s["name"] for s in json.loads(cli(serve, "servers", "--json").stdout)["servers"]} == {"example"}
    assert task_id in {t["task_id"] for t in json.loads(cli(serve, "tasks", "--json").stdout)["tasks"]}
    lines = [json.loads(line) for line in cli(serve, "status", task_id, "-f", "--json").stdout.splitlines()]
    assert lines[-1]["task_id"] == task_id and lines[-1]["status"] == "completed"


def test_config_is_taken_before_or_after_the_command(serve: Serve) -> None:
    env_free = {**cli_env(serve), "OPSPAWN_URL": ""}
    for args in (["--config", str(serve.config), "servers"], ["servers", "--config", str(serve.config)]):
        out = subprocess.run(
            [opspawn_command(), *args, "--url", serve.mcp],
            env=env_free,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0].split() == ["SERVER", "STATE", "TOOLS", "HIDDEN", "ERROR"]
    bad = cli(serve, "servers", "--config", "/nonexistent/opspawn.json")
    assert bad.returncode == 2 and "cannot read the file" in bad.stderr


def test_the_readmes_inspector_command_lists_and_calls_the_tools(serve: Serve) -> None:
    """README: the MCP Inspector's CLI, pinned to tests/node/package.json's version."""
    pinned = json.loads((REPO_ROOT / "tests/node/package.json").read_text())["dependencies"]
    assert pinned["@modelcontextprotocol/inspector"] == "2.12.0"  # the README names this version
    inspector = require_command("inspector")  # tests/node/node_modules/.bin, on PATH in `make test`
    base = [inspector, "--cli", serve.mcp, "--transport", "http", "--method"]
    listed = subprocess.run([*base, "tools/list"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert listed.returncode == 0, listed.stderr
    assert "submit_task" in {t["name"] for t in json.loads(listed.stdout)["tools"]}
    call = [
        "tools/call",
        "--tool-name",
        "submit_task",
        "--tool-arg",
        "goal=echo inspected",
        "--tool-arg",
        "wait=45",
    ]
    called = subprocess.run([*base, *call], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)["structuredContent"]
    assert (answer["status"], answer["result"]) == ("completed", "done: inspected")


# -- the server itself ---------------------------------------------------------------------------


def test_ctrl_c_with_running_tasks_says_at_once_which_it_hands_back_and_how_long_it_waits(
    tmp_path: Path,
) -> None:
    port = free_port()
    with spawn_fake_openai() as llm_url:
        path = write_serve_config(tmp_path, {"llm": fake_llm_profile(llm_url)})
        log = tmp_path / "serve.log"
        # --config and --port after the command, as a user types them.
        args = ("serve", "--config", str(path), "--port", str(port))
        with opspawn_process(*args, cwd=REPO_ROOT, env=deployment_env(), log=log) as proc:
            base = f"http://127.0.0.1:{port}"
            wait_for_http(
                proc, f"{base}/readyz", deadline_s=HANG_GUARD_S, why=lambda: log.read_text()[-3000:]
            )
            spec = {"goal": "sleep 25", "servers": ["example"]}
            ids = [
                httpx.post(f"{base}/v1/tasks", json=spec, timeout=HANG_GUARD_S).json()["task_id"]
                for _ in "ab"
            ]

            def sleeping(task_id: str) -> bool:
                task = httpx.get(f"{base}/v1/tasks/{task_id}", timeout=HANG_GUARD_S).json()
                return bool(task["status"] == "running" and task["steps"] >= 1)  # its sleep call is next

            deadline = time.monotonic() + HANG_GUARD_S
            while not all(sleeping(i) for i in ids):
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            line = "opspawn: stopping 2 running task(s) and handing them back for the next start: "
            while line not in log.read_text():
                assert proc.poll() is None, (
                    f"exited before saying what it waits for: {log.read_text()[-3000:]}"
                )
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            said = next(s for s in log.read_text().splitlines() if s.startswith(line))
            assert set(said.removeprefix(line).split(";")[0].split(", ")) == set(ids)
            assert said.endswith("; waiting at most 10 s for their agents to stop")
            assert proc.wait(timeout=HANG_GUARD_S) == 0
        assert "Traceback" not in log.read_text()


# -- errors in each door's own words ----------------------------------------------------------


def test_an_unknown_task_names_the_command_that_lists_tasks(serve: Serve) -> None:
    out = cli(serve, "status", "no-such-task")
    assert out.returncode == 2
    assert out.stderr == (
        "opspawn-mcp: No task with id 'no-such-task'. List tasks with `opspawn-mcp tasks` to find valid ids.\n"
    )
    assert cli(serve, "cancel", "no-such-task").stderr == out.stderr


def test_rest_names_its_own_routes(serve: Serve) -> None:
    answer = httpx.get(f"{serve.http}/v1/tasks/no-such-task", timeout=HANG_GUARD_S).json()
    assert (
        answer["detail"] == "No task with id 'no-such-task'. List tasks with GET /v1/tasks to find valid ids."
    )
    refused = httpx.post(
        f"{serve.http}/v1/tasks", json={"goal": "x", "servers": ["ghost"]}, timeout=HANG_GUARD_S
    ).json()
    assert refused["detail"].endswith("List them with GET /v1/servers.")


# -- a terminal gets the rich view ------------------------------------------------------------


def test_a_terminal_gets_colour_and_the_live_view(serve: Serve) -> None:
    task_id = submitted(serve, "echo on a terminal")
    followed = on_a_terminal(serve, "status", "--follow", task_id)
    assert "\x1b[" in followed  # rich's styles and cursor moves
    assert "example__echo" in followed and "completed" in followed
    table = on_a_terminal(serve, "tasks", task_id)
    assert "\x1b[" in table and task_id in table and "STATUS" in table
