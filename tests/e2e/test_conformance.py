"""The MCP conformance suite (``@modelcontextprotocol/conformance``, pinned in tests/node) for real.

The ten ``tasks-*`` scenarios run against the tasks fixture (``tests.servers.tasks_conformance``,
opspawn's own ``TasksExtension`` over the in-memory backend); the generic scenarios of both
protocol eras run against a real ``opspawn-mcp serve``. "Generic" means every scenario of the
era's requirement set that needs no fixture of the suite's own reference server: the others call
tools, prompts and resources (``test_image_content``, ``test_simple_prompt``...) that only the
suite's "everything" server has. A scenario passes when none of its checks is a ``FAILURE``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.harness import REPO_ROOT
from tests.servers.tasks_conformance import spawn_tasks_fixture
from tests.support.fake_openai import spawn_fake_openai
from tests.support.serve import ServerProcess, write_config
from tests.support.services import require_command

pytestmark = pytest.mark.node

TASKS_SCENARIOS = [
    "tasks-lifecycle",
    "tasks-capability-negotiation",
    "tasks-wire-fields",
    "tasks-request-state-removal",
    "tasks-mrtr-input",
    "tasks-request-headers",
    "tasks-dispatch-and-envelope",
    "tasks-status-notifications",
    "tasks-required-task-error",
    "tasks-mrtr-composition",
]
BOTH_ERAS = [
    "tools-list",
    "tools-call-simple-text",
    "tools-call-error",
    "server-sse-multiple-streams",
    "resources-list",
    "prompts-list",
    "dns-rebinding-protection",
]
GENERIC_SCENARIOS = {
    "2025-11-25": ["server-initialize", "server-session-lifecycle", "logging-set-level", "ping", *BOTH_ERAS],
    "2026-07-28": BOTH_ERAS,
}
SCENARIO_TIMEOUT_S = 120


def run_scenario(url: str, scenario: str, out: Path, *extra: str) -> list[dict[str, object]]:
    """Run one scenario with the pinned suite; its checks as the suite wrote them."""
    out.mkdir(parents=True, exist_ok=True)
    command = [require_command("conformance"), "server", "--url", url, "--scenario", scenario, "-o", str(out)]
    done = subprocess.run(
        [*command, *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S
    )
    found = sorted(out.glob("*/checks.json"))
    assert found, f"{scenario} wrote no checks.json:\n{done.stdout}\n{done.stderr}"
    checks: list[dict[str, object]] = json.loads(found[-1].read_text())
    return checks


def failures(checks: list[dict[str, object]]) -> list[str]:
    return [f"{c['id']}: {c.get('errorMessage')}" for c in checks if c["status"] == "FAILURE"]


@pytest.fixture(scope="module")
def fixture_url() -> Iterator[str]:
    with spawn_tasks_fixture() as url:
        yield url


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with spawn_fake_openai() as llm_url:
        server = ServerProcess(write_config(tmp_path_factory.mktemp("serve") / "opspawn.json", llm_url))
        try:
            yield server.url
        finally:
            server.stop()


@pytest.mark.parametrize("scenario", TASKS_SCENARIOS)
def test_tasks_fixture_passes_the_tasks_scenario(fixture_url: str, scenario: str, tmp_path: Path) -> None:
    checks = run_scenario(fixture_url, scenario, tmp_path)
    assert not failures(checks), failures(checks)
    if scenario != "tasks-status-notifications":  # the suite itself skips that one for now
        assert any(c["status"] == "SUCCESS" for c in checks), checks


@pytest.mark.parametrize(
    ("era", "scenario"), [(era, s) for era, names in GENERIC_SCENARIOS.items() for s in names]
)
def test_opspawn_serve_passes_the_generic_scenario(
    serve_url: str, era: str, scenario: str, tmp_path: Path
) -> None:
    checks = run_scenario(serve_url, scenario, tmp_path, "--spec-version", era)
    assert not failures(checks), failures(checks)
    assert any(c["status"] == "SUCCESS" for c in checks), checks
