"""The OpenAPI document must be true: schemathesis generates requests from it (valid and
invalid) against the real gateway over the real TaskService, and every answer must be a
documented status with a body matching the documented schema, and never a 5xx.

schemathesis is bounded in pyproject's test extra (>=4.32,<5; written and run against 4.32.5)
because its generators and checks change between major releases.
"""

from __future__ import annotations

import asyncio
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from gateway.app import create_gateway
from opspawn_mcp.http_guard import HttpGuard
from opspawn_mcp.models import TaskStatus, Usage
from opspawn_mcp.principals import Principal
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.openapi_checks import CONFORMANCE_CHECKS
from tests.support.service_kit import make_service
from tests.unit.test_gateway import principals_with

TOKEN = "schemathesis-token"
PRINCIPALS = principals_with({"ci": {"token_env": "CI_TOKEN"}}, {"CI_TOKEN": TOKEN})
CI = PRINCIPALS.authenticate(f"Bearer {TOKEN}")


async def _seed(service: TaskService, store: MemoryStore, by: Principal) -> None:
    """Tasks in every state, so listing them puts every optional Task field under the schema check."""
    done, failed, cancelled, _queued = [
        (await service.submit({"goal": goal, "servers": ["echo"]}, by=by)).id for goal in "abcd"
    ]
    for task_id, status, extra in (
        (done, TaskStatus.COMPLETED, {"result": "42", "usage": Usage(input_tokens=3, output_tokens=4)}),
        (failed, TaskStatus.FAILED, {"error": "the LLM refused"}),
    ):
        await store.claim(task_id, "w1", 30.0, 3)
        await store.append_event(task_id, "tool_call", {"tool": "echo__echo", "arguments": {"text": "x"}})
        await store.transition(task_id, {TaskStatus.RUNNING}, status, owner="w1", **extra)
    await service.cancel(cancelled, by=by)


def _app() -> object:
    # MemoryStore.start only flips a flag; the store is usable without awaiting it here.
    store = MemoryStore()
    service = make_service(store)
    assert CI is not None
    asyncio.run(_seed(service, store, CI))
    # The REST gateway behind the guard of the served app (schemathesis sends Host: testserver).
    # Without the MCP routes: their session manager cannot restart, and schemathesis restarts the
    # app's lifespan for every test.
    return create_gateway(
        service, HttpGuard.for_server(PRINCIPALS, "127.0.0.1", 0, allowed_hosts=["testserver"])
    )


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers={"Authorization": f"Bearer {TOKEN}"})


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_openapi_document(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CONFORMANCE_CHECKS)
