"""Metrics and JSON logs of a real ``opspawn-mcp serve --log-format json`` after a real task.

One serve process (embedded worker, SQLite store, the testing MCP server, the fake
OpenAI-compatible LLM in its own process, rule mode: ``echo hello`` calls ``testing__echo`` and
answers ``done: hello``), two principals: ``ops`` (admin) and ``alice``. The task is submitted
over REST as alice; ``/metrics`` is scraped and parsed with ``prometheus_client``'s own parser,
and the process's stderr is read back line by line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from opspawn_mcp.models import TaskStatus
from tests.servers.harness import HANG_GUARD_S, REPO_ROOT, free_port, opspawn_process
from tests.support.fake_openai import spawn_fake_openai
from tests.support.metrics import sample, samples
from tests.support.serve import write_config

TOKENS = {"ops": "obs-e2e-admin-token", "alice": "obs-e2e-alice-token"}


@dataclass(frozen=True)
class Served:
    base: str
    log: Path
    task: dict[str, Any]

    def get(self, path: str, principal: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKENS[principal]}"} if principal else {}
        return httpx.get(f"{self.base}{path}", headers=headers, timeout=30)


def _until(what: str, check: Any) -> Any:
    """Poll another process; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + HANG_GUARD_S
    while (found := check()) is None:
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.05)
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("observability")
    port = free_port()
    with spawn_fake_openai() as llm_url:
        tokens = {
            "ops": {"token_env": "OBS_OPS_TOKEN", "admin": True},
            "alice": {"token_env": "OBS_ALICE_TOKEN"},
        }
        path = write_config(tmp / "opspawn.json", llm_url, port=port, tokens=tokens)
        env = {**os.environ, "OBS_OPS_TOKEN": TOKENS["ops"], "OBS_ALICE_TOKEN": TOKENS["alice"]}
        log = tmp / "serve.log"
        args = ("--config", str(path), "serve", "--log-format", "json")
        with opspawn_process(*args, cwd=REPO_ROOT, env=env, log=log) as proc:
            base = f"http://127.0.0.1:{port}"

            def ready() -> bool | None:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    return httpx.get(f"{base}/readyz", timeout=1).status_code == 200 or None
                except httpx.HTTPError:
                    return None

            _until("serve ready", ready)
            alice = {"Authorization": f"Bearer {TOKENS['alice']}"}
            submitted = httpx.post(f"{base}/v1/tasks", json={"goal": "echo hello"}, headers=alice, timeout=30)
            assert submitted.status_code == 202, submitted.text
            location = httpx.URL(base).join(submitted.headers["location"])

            def finished() -> dict[str, Any] | None:
                task: dict[str, Any] = httpx.get(location, headers=alice, timeout=30).json()
                return task if TaskStatus(task["status"]).terminal else None

            task = _until("the task finishing", finished)
            assert task["status"] == "completed", task
            yield Served(base, log, task)


def test_metrics_after_a_task_count_it_from_the_store_and_from_this_process(served: Served) -> None:
    scrape = served.get("/metrics", "ops")
    assert scrape.status_code == 200, scrape.text
    assert scrape.headers["content-type"].startswith("text/plain")
    found = samples(scrape.text)

    def value(name: str, **labels: str) -> float:
        return found[sample(name, **labels)]

    assert {status.value: value("opspawn_tasks", state=status.value) for status in TaskStatus} == {
        **{status.value: 0.0 for status in TaskStatus},
        "completed": 1.0,
    }
    assert value("opspawn_queue_depth") == 0
    assert value("opspawn_task_duration_seconds_count", status="completed") == 1
    assert value("opspawn_task_duration_seconds_sum", status="completed") > 0
    assert value("opspawn_llm_calls_total", profile="default", outcome="ok") == 2  # the call, the answer
    usage = served.task["usage"]
    assert value("opspawn_llm_tokens_total", profile="default", type="input") == usage["input_tokens"]
    assert value("opspawn_llm_tokens_total", profile="default", type="output") == usage["output_tokens"]
    assert value("opspawn_downstream_calls_total", server="testing", outcome="ok") == 1
    assert value("opspawn_downstream_call_duration_seconds_count", server="testing") == 1
    assert (
        "opspawn_downstream_calls_total",
        frozenset({("server", "testing"), ("outcome", "error")}),
    ) not in found


def test_metrics_are_behind_the_guard_and_for_admins_only(served: Served) -> None:
    anonymous = served.get("/metrics", None)
    assert anonymous.status_code == 401 and anonymous.json()["kind"] == "unauthenticated"
    alice = served.get("/metrics", "alice")
    assert alice.status_code == 403, alice.text
    assert alice.json()["kind"] == "forbidden" and '"admin": true' in alice.json()["detail"]


def test_json_logs_are_one_object_a_line_with_the_task_id_while_it_runs(served: Served) -> None:
    lines = served.log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line: a log pipeline reads only JSON
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert any(e["message"].startswith("opspawn: serving MCP at ") for e in entries)
    task_id = served.task["task_id"]
    finished = [e for e in entries if e["message"] == f"task {task_id} completed"]
    assert len(finished) == 1 and finished[0]["task_id"] == task_id
    assert all(e.get("task_id") in (None, task_id) for e in entries)
