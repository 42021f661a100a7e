"""A SIGSTOPped downstream server (issue 11: "a frozen or failing downstream is not a success").

With ``timeout_s: 2`` and ``max_timeouts: 2`` on the counting server (long enough that a healthy
call does not time out on a loaded machine; the frozen phase costs two of them): a task whose two
tool calls go to the frozen process must fail naming the timeout (or complete with an explicit
warning naming it), never complete as if the tools had worked; the pool marks the server
``unhealthy`` and replaces the process; the next task's call succeeds on a new process. Every wait
is the harness's hang guard, never a short deadline.

Run twice: tasks on the embedded worker (``serve``'s own pool, so ``GET /v1/servers`` must show
``unhealthy``), and on an ``opspawn-mcp worker`` process (whose pool ``/v1/servers`` of serve does
not show: there the replacement is checked by pid).
"""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from contextlib import suppress
from pathlib import Path

import pytest

from opspawn_mcp.models import TaskStatus
from tests.faults.harness import deployment, poll
from tests.servers.harness import is_alive
from tests.support.counting_servers import expected_result, goal
from tests.support.services import RABBITMQ_URL, require_service

pytestmark = [pytest.mark.postgres]

TIMEOUT_S = 2
TIMEOUT = re.compile(r"time(d)?[ -]?out|did not answer .*within", re.IGNORECASE)


def _state(proc_pid: int) -> str:
    """The /proc state letter (T: stopped, Z: zombie), or '' once the process is gone."""
    try:
        return Path(f"/proc/{proc_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


@pytest.mark.parametrize("where", ["embedded", "worker"])
async def test_a_sigstopped_downstream_fails_the_task_with_the_timeout_and_is_replaced(
    tmp_path: Path, where: str
) -> None:
    if where == "worker":
        require_service("rabbitmq")
    async with deployment(
        tmp_path,
        broker_url="embedded" if where == "embedded" else RABBITMQ_URL,
        workers=0 if where == "embedded" else 1,
        server={"timeout_s": TIMEOUT_S, "max_timeouts": 2},
    ) as stack:
        run = uuid.uuid4().hex[:6]
        warm, frozen, after = f"warm-{run}", f"frozen-{run}", f"after-{run}"

        warm_id = await stack.submit(goal(warm, "record"))
        task = (await stack.finished([warm_id]))[warm_id]
        assert task.status is TaskStatus.COMPLETED, f"{task.error}\n{stack.logs()}"
        (call,) = stack.journal.tool_calls(warm)
        pid = call["pid"]

        os.kill(pid, signal.SIGSTOP)
        try:
            frozen_id = await stack.submit(goal(frozen, "record", "record"))
            task = (await stack.finished([frozen_id]))[frozen_id]
            events = await stack.events(frozen_id)
            async with stack.client() as client:
                shown = (await client.get(f"/v1/tasks/{frozen_id}")).json()
            # A warning on the task: in the final event, or on the task as the doors show it.
            warnings = [w for e in events if e.kind == "final" for w in e.data.get("warnings") or []]
            warnings += [e.data["reason"] for e in events if e.kind == "state" and e.data.get("reason")]
            warnings += list(shown.get("warnings") or [])
            said = json.dumps({"error": task.error, "warnings": warnings, "events": [e.kind for e in events]})
            assert stack.journal.tool_calls(frozen) == [], "the frozen process answered"
            if task.status is TaskStatus.FAILED:
                assert task.error and TIMEOUT.search(task.error), f"failed without naming the timeout: {said}"
            else:
                assert task.status is TaskStatus.COMPLETED, f"{task.status}: {said}"
                assert any(TIMEOUT.search(str(w)) for w in warnings), (
                    f"completed with no warning naming the timeout: result {task.result!r}, {said}"
                )

            if where == "embedded":
                # serve's own pool ran the calls: it must say so, until the next call replaces it.
                async def unhealthy() -> bool:
                    return any(s["name"] == "c" and s["state"] == "unhealthy" for s in await stack.servers())

                await poll(unhealthy, "GET /v1/servers showed 'c' unhealthy")
            # The frozen process is replaced: killed (a stopped process only dies by SIGKILL)...
            await poll(lambda: _state(pid) in ("", "Z"), f"the frozen process {pid} was killed")
        finally:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

        # ...and the next task's call runs on a new process.
        after_id = await stack.submit(goal(after, "record"))
        task = (await stack.finished([after_id]))[after_id]
        assert task.status is TaskStatus.COMPLETED, f"{task.error}\n{stack.logs()}"
        assert task.result == expected_result(after, f"recorded {after}/1")
        (call,) = stack.journal.tool_calls(after)
        assert call["pid"] != pid and is_alive(call["pid"])
