"""schemathesis against the live ``/openapi.json`` of a real ``serve``: the document is the contract.

Pins issue 10's input-contract items "CI runs schemathesis against /openapi.json with at least
1,000 cases and 0 server errors" and "the OpenAPI document describes exactly what the server
accepts". One ``serve`` (token auth, embedded worker, the example MCP server, the fake LLM) is
fuzzed over real HTTP with schemathesis' positive (schema-valid) and negative (schema-invalid)
cases for every documented operation: every answer must be a documented status, never 5xx,
with the documented content type, headers and body schema. The share of positive
``POST /v1/tasks`` cases that created a task (202) is printed and must stay high: a positive
case the server refuses means the document promises something the server does not accept.

Bounded for CI: hypothesis is derandomized with no example database and no deadline, so every
run generates the same cases; the only wait is the harness's hang guard.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.security.kit import Serve, capturing_llm, run_serve, wait_done
from tests.support.openapi_checks import CONFORMANCE_CHECKS
from tests.support.serve import fake_llm_profile

TOKEN = f"fuzz-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 130
"""Per operation and mode: 5 operations with parameters x 2 modes x 130 is well over 1,000."""
MIN_CASES = 1000
MIN_POSITIVE_SUBMIT_SHARE = 0.9
"""Measured: 54 of the 55 counted (the document names the configured servers and profiles and forbids NUL;
what remains is a goal of only whitespace, which the service calls empty)."""


@dataclass
class FuzzRun:
    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter[int]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    repeated_key: dict[str, collections.Counter[int]] = field(default_factory=dict)
    """Per label, the statuses of cases with a repeated Idempotency-Key or a delegation chain."""
    keys_seen: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.cases.values())


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("openapi-fuzz")
    with capturing_llm() as llm:
        opspawn = {
            "llm": fake_llm_profile(llm.base_url),
            "server": {"tokens": {"fuzz": {"token_env": "SEC_FUZZ", "admin": True}}},
        }
        with run_serve(tmp, opspawn, env={"SEC_FUZZ": TOKEN}) as running:
            yield running


def _seed(serve: Serve) -> None:
    """Tasks in every terminal state, so listing them puts every optional field under the check."""
    with httpx.Client(base_url=serve.http, headers=AUTH, timeout=30) as client:

        def submit(spec: dict[str, object]) -> str:
            task_id: str = client.post("/v1/tasks", json=spec).json()["task_id"]
            return task_id

        done = submit({"goal": "echo seeded", "servers": ["example"]})
        failed = submit({"goal": "echo x", "budget": {"max_llm_tokens": 1}})
        sleeping = submit({"goal": "sleep 30", "servers": ["example"]})
        assert client.post(f"/v1/tasks/{sleeping}/cancel").status_code == 200

    async def finished() -> None:
        for task_id in (done, failed):
            await wait_done(serve, TOKEN, task_id)

    anyio.run(finished)


def _fuzzer(operation: Any, mode: GenerationMode, label: str, run: FuzzRun) -> Any:
    """A hypothesis test of one operation in one mode, counting its cases and statuses."""
    statuses = run.statuses.setdefault(label, collections.Counter())
    statuses_repeat = run.repeated_key.setdefault(label, collections.Counter())

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def one(case: schemathesis.Case[Any]) -> None:
        run.cases[label] += 1
        # Stream endpoints end when the task does; a 30 s bound keeps a mistake finite.
        response = case.call(headers=AUTH, timeout=30)
        statuses[response.status_code] += 1
        key = (case.headers or {}).get("Idempotency-Key")
        chain = case.body.get("chain") if isinstance(case.body, dict) else None
        if (key is not None and key in run.keys_seen) or chain:
            # A key seen before names an earlier request (a 409 for another body is the
            # documented answer), and a made-up delegation chain may be refused as a loop (403):
            # only the other cases count towards the share of accepted submits.
            statuses_repeat[response.status_code] += 1
        if key is not None:
            run.keys_seen.add(key)
        if mode == GenerationMode.POSITIVE and response.status_code >= 400:
            kept = run.samples.setdefault(f"{label} -> {response.status_code}", [])
            if len(kept) < 3:
                kept.append(f"{case.query or ''} {case.body!r:.200} -> {response.text[:300]}")
        case.validate_response(response, checks=CONFORMANCE_CHECKS, headers=AUTH)

    return one


@pytest.fixture(scope="module")
def fuzz(serve: Serve) -> FuzzRun:
    """Every documented operation, positive then negative; failures are collected, not raised,
    so one report names every operation that broke the contract."""
    _seed(serve)
    schema = schemathesis.openapi.from_url(f"{serve.http}/openapi.json", headers=AUTH)
    run = FuzzRun()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{mode.value} {operation.method.upper()} {operation.path}"
            try:
                _fuzzer(operation, mode, label, run)()
            except Unsatisfiable:
                # An operation with no parameters has no schema-invalid request to make.
                assert mode == GenerationMode.NEGATIVE and not run.cases[label], label
            except Exception as exc:  # hypothesis re-raises the minimal failing case's error
                run.failures[label] = f"{type(exc).__name__}: {exc}"[:3000]
    report = "\n".join(
        f"  {label}: {run.cases[label]} cases, statuses {dict(c)}" for label, c in run.statuses.items()
    )
    print(f"\nschemathesis: {run.total} cases against the live /openapi.json\n{report}")
    print("positive cases the server refused, a few of each:")
    for label, items in run.samples.items():
        print(f"  {label}", *items, sep="\n    ")
    return run


def test_every_generated_request_gets_a_documented_answer_and_no_5xx(fuzz: FuzzRun) -> None:
    assert fuzz.total >= MIN_CASES, f"only {fuzz.total} cases ran; raise MAX_EXAMPLES"
    server_errors = {label: c for label, c in fuzz.statuses.items() if any(s >= 500 for s in c)}
    assert not server_errors, server_errors
    assert not fuzz.failures, "\n\n".join(f"{label}:\n{text}" for label, text in fuzz.failures.items())


def test_positive_submits_mostly_create_tasks(fuzz: FuzzRun) -> None:
    label = "positive POST /v1/tasks"
    statuses = fuzz.statuses[label] - fuzz.repeated_key[label]
    total = sum(statuses.values())
    share = statuses[202] / total if total else 0.0
    print(
        f"\npositive POST /v1/tasks: {statuses[202]}/{total} created a task ({share:.0%}); {dict(statuses)}"
    )
    assert total >= 50, statuses  # measured: 55 of 130 carry no chain and no repeated key
    assert share >= MIN_POSITIVE_SUBMIT_SHARE, (
        f"only {share:.0%} of schema-valid submits were accepted: {dict(statuses)}; the document "
        "promises requests the server refuses"
    )
