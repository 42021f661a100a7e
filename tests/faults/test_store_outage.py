"""PostgreSQL stopped and started during 50 tasks (issue 11).

The cluster is the test's own (``services.private_postgres``). While it is down the REST door
answers 503 (a problem saying the store is unavailable, not a 500 or a hang). Once it is back,
50/50 complete exactly once, with the right result, and no task re-ran from scratch: each task's
requests to the model and the tool arrive in step order (model 0, tool 1, model 1), so none asked
its first question again after it had been answered; only the request in flight at the outage
may come twice.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

from tests.faults.harness import deployment, poll
from tests.faults.services import private_postgres
from tests.support.counting_servers import expected_result, goal
from tests.support.services import RABBITMQ_URL, require_service

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

TASKS = 50
PROBES = 3


async def test_postgresql_stopped_and_started_during_50_tasks_503_meanwhile_all_complete_none_rerun(
    tmp_path: Path,
) -> None:
    require_service("rabbitmq")
    with private_postgres() as pg:
        async with deployment(
            tmp_path,
            store_url=pg.url,
            broker_url=RABBITMQ_URL,
            workers=2,
            llm_delay=0.3,  # tasks are in flight when the store goes away
        ) as stack:
            run = uuid.uuid4().hex[:6]
            jobs = [f"p{i}-{run}" for i in range(TASKS)]
            ids = {job: await stack.submit(goal(job, "record")) for job in jobs}

            unfinished: list[str] = []

            async def some_done() -> bool:
                unfinished[:] = [j for j in jobs if not (await stack.store.get(ids[j])).status.terminal]
                return len(unfinished) <= TASKS - 8

            await poll(some_done, "8 tasks finished", interval=0.1)
            pg.stop()
            assert unfinished, "every task had finished before the outage: it tested nothing"
            answers: list[tuple[str, int, str]] = []
            try:
                async with stack.client() as client:
                    for i in range(PROBES):
                        r = await client.get(f"/v1/tasks/{ids[jobs[-1 - i]]}")
                        answers.append(("GET /v1/tasks/{id}", r.status_code, r.text[:300]))
                        await anyio.sleep(0.3)
                    r = await client.post("/v1/tasks", json={"goal": goal(f"x-{run}"), "servers": ["c"]})
                    answers.append(("POST /v1/tasks", r.status_code, r.text[:300]))
                    r = await client.get("/readyz")
                    answers.append(("GET /readyz", r.status_code, r.text[:300]))
                await anyio.sleep(1.0)
            finally:
                pg.start()
            assert all(code == 503 for _, code, _ in answers), f"while PostgreSQL was down: {answers}"

            await stack.reopen_store()
            done = await stack.finished(ids.values())
            problems: list[str] = []
            for job in jobs:
                expected = expected_result(job, f"recorded {job}/1")
                problems += await stack.once_problems(job, done[ids[job]], expected)
                counts = stack.journal.counts(job)
                if any(n > 2 for n in counts.values()):
                    problems.append(f"{job}: a request came more than twice: {counts}")
            assert not problems, (
                f"{len(problems)} problems:\n" + "\n".join(problems[:40]) + f"\n{stack.logs()[-6000:]}"
            )
