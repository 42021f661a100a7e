"""RabbitMQ ``stop_app`` / ``start_app`` during 200 tasks (issue 11: "accepted means it runs").

The node is the test's own (``services.private_rabbitmq``), so the outage touches nobody else.
Tasks are small (one model call, no tool). Tasks are submitted before, during and after the
outage, which starts once 10 of the first 80 completed (a count, not a timer); every one accepted must complete exactly once, with no process restarted: the same
``serve`` and the same two workers run from the first task to the last.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from opspawn_mcp.models import TaskStatus
from tests.faults.harness import deployment, poll
from tests.faults.services import private_rabbitmq
from tests.support.counting_servers import expected_result, goal

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

BEFORE, DURING, AFTER = 80, 40, 80
OUTAGE_AFTER = 10
"""The node is stopped once this many of the first BEFORE tasks completed: progress, not time."""


async def test_rabbitmq_stop_app_start_app_during_200_tasks_all_complete_nothing_restarted(
    tmp_path: Path,
) -> None:
    with private_rabbitmq() as rabbit:
        async with deployment(
            tmp_path,
            broker_url=rabbit.url,
            workers=2,
            llm_delay=0.05,
        ) as stack:
            processes = [stack.serve, *(w.process for w in stack.workers)]
            pids = [p.pid for p in processes if p is not None]
            run = uuid.uuid4().hex[:6]
            jobs = [f"b{i}-{run}" for i in range(BEFORE + DURING + AFTER)]
            ids: dict[str, str] = {}
            for job in jobs[:BEFORE]:
                ids[job] = await stack.submit(goal(job))

            async def under_way() -> bool:
                counts = await stack.store.count_by_status()
                return counts.get(TaskStatus.COMPLETED, 0) >= OUTAGE_AFTER

            # The outage comes once the run is under way, however slow the machine.
            await poll(under_way, f"{OUTAGE_AFTER} tasks completed before the outage")
            rabbit.stop_app()
            try:
                for job in jobs[BEFORE : BEFORE + DURING]:
                    ids[job] = await stack.submit(goal(job))  # the store is up: accepted
            finally:
                rabbit.start_app()
            for job in jobs[BEFORE + DURING :]:
                ids[job] = await stack.submit(goal(job))

            done = await stack.finished(ids.values())
            problems: list[str] = []
            for job in jobs:
                task = done[ids[job]]
                if task.status is not TaskStatus.COMPLETED or task.result != expected_result(job):
                    problems.append(
                        f"{job}: {task.status.value}, result {task.result!r}, error {task.error!r}"
                    )
                asked = len(stack.journal.llm_requests(job))
                if asked != 1:
                    problems.append(f"{job}: the model was asked {asked} times")
                completed = await stack.completed_events(ids[job])
                if completed != 1:
                    problems.append(f"{job}: {completed} 'completed' state events")
            restarted = [p.pid for p in processes if p is None or p.poll() is not None]
            assert not restarted, f"processes ended during the run: {restarted} of {pids}\n{stack.logs()}"
            assert len(stack.workers) == 2, "a worker was started again"
            assert not problems, (
                f"{len(problems)} problems:\n" + "\n".join(problems[:40]) + f"\n{stack.logs()[-6000:]}"
            )
