"""kill -9 of the worker at each step boundary of a two-tool task (issue 11).

One task per kill point is held exactly there by the counting servers (the LLM request or the
tool call has *arrived* and is blocked), all in one worker; when every hold is reached the worker
and its downstream process are killed with SIGKILL and a new worker is started. Each task must
then complete with the right result, and its request counts must equal a crash-free run's plus,
at most, the one call that was in flight: a finished model call is not asked again, a finished
tool call is not run again, and a non-idempotent tool in flight is never run again (the model is
told the call was interrupted). Every call of one (task, step) carries one idempotency key.

Counts and outcomes only; no durations.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from opspawn_mcp.models import TaskStatus
from tests.faults.harness import deployment, poll
from tests.support.counting_servers import expected_result, goal
from tests.support.services import RABBITMQ_URL, require_service

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

# The kill points, each as (where the task is held, the request in flight there).
POINTS = {
    "during_llm_call_1": ("llm", 0),  # the model has been asked for step 1, no answer yet
    "during_tool_1": ("tool", 1),  # the model chose tool 1; tool 1 is running
    "between_tool_1_and_llm_call_2": ("llm", 1),  # tool 1 finished; the model has been asked again
    "during_tool_2": ("tool", 2),  # tool 2 is running
    "during_final_answer": ("llm", 2),  # both tools finished; the final answer is being asked for
}


def _name(src: str, index: int) -> str:
    return f"llm{index}" if src == "llm" else f"tool{index}"


@pytest.mark.parametrize("tool", ["record", "charge"], ids=["idempotent", "non_idempotent"])
async def test_kill_9_at_each_step_boundary_of_a_two_tool_task(tmp_path: Path, tool: str) -> None:
    require_service("rabbitmq")
    async with deployment(
        tmp_path,
        broker_url=RABBITMQ_URL,
        worker={"concurrency": 8},
        # Held requests wait until every task reached its point, however loaded the machine;
        # neither the model call nor the tool call may time out first (the hang guard does).
        llm_timeout_s=120,
        server={"timeout_s": 120},
    ) as stack:
        run = uuid.uuid4().hex[:6]
        verb = "recorded" if tool == "record" else "charged"

        # The crash-free run these counts are measured against.
        base = f"base-{run}"
        base_id = await stack.submit(goal(base, tool, tool))
        base_task = (await stack.finished([base_id]))[base_id]
        assert base_task.status is TaskStatus.COMPLETED, f"{base_task.error}\n{stack.logs()}"
        assert base_task.result == expected_result(base, f"{verb} {base}/1", f"{verb} {base}/2")
        crash_free = stack.journal.counts(base)
        assert crash_free == {"llm0": 1, "tool1": 1, "llm1": 1, "tool2": 1, "llm2": 1}

        # One task held at each kill point.
        jobs = {point: f"{point.replace('_', '')[:14]}-{run}" for point in POINTS}
        for point, (src, index) in POINTS.items():
            block = stack.control.block_llm if src == "llm" else stack.control.block_tool
            block(jobs[point], index)
        ids = {point: await stack.submit(goal(jobs[point], tool, tool)) for point in POINTS}

        def all_held() -> bool:
            return all(
                (
                    stack.journal.llm_requests(jobs[p], i)
                    if s == "llm"
                    else stack.journal.tool_calls(jobs[p], i)
                )
                for p, (s, i) in POINTS.items()
            )

        await poll(all_held, "every task reached its kill point")
        first = stack.workers[0]
        first.kill_hard()
        for point in POINTS:
            status = (await stack.store.get(ids[point])).status
            assert status is TaskStatus.RUNNING, f"{point}: {status} before the restart"
        # Let any held request of the dead worker's go (nobody is listening for it any more);
        # a re-ask of a held request is not held: only the first arrival of each is.
        stack.control.release_all()
        await stack.add_worker()

        done = await stack.finished(ids.values())
        problems: list[tuple[str, list[str]]] = []
        for point, (src, index) in POINTS.items():
            job, task = jobs[point], done[ids[point]]
            in_flight = _name(src, index)
            counts = stack.journal.counts(job)
            where = f"{point} ({tool}): counts {counts}, {task.status.value}, result {task.result!r}, error {task.error!r}"
            issues: list[str] = []
            problems.append((where, issues))
            # Nothing but the call in flight may have run more often than in the crash-free run.
            for step, n in crash_free.items():
                if step != in_flight and counts.get(step, 0) != n:
                    issues.append(f"{step} ran {counts.get(step, 0)} times, crash-free {n}")
            again = counts.get(in_flight, 0)
            allowed = 1 if (src == "tool" and tool == "charge") else 2
            if not 1 <= again <= allowed:
                issues.append(f"the in-flight {in_flight} ran {again} times (allowed 1..{allowed})")
            redone = stack.journal.redone(job)
            if redone:
                issues.append(f"finished work redone: {redone}")
            for n in (1, 2):
                keys = stack.journal.keys(job, n)
                if len(keys) != 1 or None in keys:
                    issues.append(f"the calls of tool {n} carried idempotency keys {keys}")
            if task.attempts != 2:
                issues.append(f"{task.attempts} attempts, expected 2 (one killed, one resumed)")
            completed = await stack.completed_events(ids[point])
            interrupted = src == "tool" and tool == "charge"
            if not interrupted:
                expected = expected_result(job, f"{verb} {job}/1", f"{verb} {job}/2")
                if task.status is not TaskStatus.COMPLETED or task.result != expected or completed != 1:
                    issues.append(f"expected completed once with {expected!r} ({completed} completed events)")
                continue
            # A non-idempotent call in flight: the model is told it was interrupted, never re-run.
            told = [
                e["tool_results"][index - 1]
                for e in stack.journal.llm_requests(job)
                if len(e["tool_results"]) >= index
            ]
            if not told or not all("interrupt" in t.lower() for t in told):
                issues.append(f"the model was not told tool {index} was interrupted: {told}")
            if task.status is TaskStatus.COMPLETED:
                if completed != 1 or task.result is None or f"charged {job}/{index}" in task.result:
                    issues.append(f"completed {completed} times with a result claiming the charge")
            elif task.status is TaskStatus.FAILED:
                if not task.error or "interrupt" not in task.error.lower():
                    issues.append("failed without saying the call was interrupted")
            else:
                issues.append(f"ended {task.status}")
        failed = [f"{where}:\n    " + "\n    ".join(issues) for where, issues in problems if issues]
        assert not failed, "\n".join(failed) + f"\n{stack.logs()[-6000:]}"
