"""Counting servers for the fault tests: a downstream MCP server and a scripted LLM server that
log every request they receive to ONE shared journal file, and can hold a chosen request until a
test releases it (so a test kills a worker *during* a model or tool call, deterministically).

Both append one JSON line per request to the same file under an exclusive ``flock``, so the
file's line order is the order in which requests arrived across every process (the LLM server,
each downstream process a worker started): a test reads exactly which call happened before which.

The downstream MCP server (stdio; one per worker process)::

    python -m tests.support.counting_servers mcp --log LOG --control DIR

* ``record(job, n)``: annotated ``idempotentHint=True`` (a re-run is harmless); returns
  ``"recorded <job>/<n>"``;
* ``charge(job, n)``: ``idempotentHint=False, destructiveHint=True`` (a re-run charges twice);
  returns ``"charged <job>/<n>"``;
* ``gate(name)``: waits until ``DIR/release-gate-<name>`` exists, then returns ``"passed <name>"``.

Each call logs ``{"src": "tool", "tool", "job", "n", "args", "meta", "pid", "time"}`` where
``meta`` is the request's ``_meta`` (the worker's idempotency key travels there). At start the
process logs ``{"src": "mcp-start", "pid"}``. A call to ``record``/``charge`` whose ``(job, n)``
has not been received before (by any process) *blocks* while ``DIR/block-tool-<job>-<n>``
exists and ``DIR/release-tool-<job>-<n>`` does not: the first call blocks, a re-run after a crash
does not.

The scripted LLM server (OpenAI-compatible over HTTP, ``tests.support.fake_openai`` underneath)::

    python -m tests.support.counting_servers llm --port P --log LOG --control DIR [--delay S]

The goal names its job and its tools: ``job <job>: call record charge`` (any number of tools,
``call nothing`` for none). The reply depends only on how many ``tool`` messages the request
already holds (``k``), so a resumed run that asks again gets the same answer:

* ``k < len(tools)``: call the offered tool whose name ends in ``__<tools[k]>`` with
  ``{"job": job, "n": k + 1}``;
* otherwise: the final answer ``"final: <job>: " + " | ".join(tool message contents)``
  (``"final: <job>"`` with no tools).

Each request logs ``{"src": "llm", "job", "k", "tool_results", "time"}``. The first request for a
``(job, k)`` blocks while ``DIR/block-llm-<job>-<k>`` exists and ``DIR/release-llm-<job>-<k>``
does not; ``--delay`` makes every reply that much later (so kills land mid-task).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations

GOAL = re.compile(r"job (?P<job>[A-Za-z0-9_.-]+): call (?P<tools>[a-z ]+)")
POLL_S = 0.02


def goal(job: str, *tools: str) -> str:
    """The goal that makes the scripted LLM call ``tools`` in order (none: answer at once)."""
    return f"job {job}: call {' '.join(tools) or 'nothing'}"


def expected_result(job: str, *outputs: str) -> str:
    """The scripted LLM's final answer after tool results ``outputs``."""
    return f"final: {job}: " + " | ".join(outputs) if outputs else f"final: {job}"


def _append(log: Path, entry: dict[str, Any], counts_as: dict[str, Any] | None = None) -> int:
    """Append ``entry`` under an exclusive lock; return how many earlier lines match ``counts_as``
    (every key equal), read under the same lock, so "the first such request" is exact."""
    entry = {**entry, "time": time.time()}
    with log.open("a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            before = 0
            if counts_as is not None:
                f.seek(0)
                for line in f:
                    try:
                        seen = json.loads(line)
                    except ValueError:
                        continue
                    if all(seen.get(k) == v for k, v in counts_as.items()):
                        before += 1
            f.seek(0, os.SEEK_END)
            f.write(json.dumps(entry, default=str, sort_keys=True) + "\n")
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return before


async def _hold(control: Path, what: str) -> None:
    """Wait while ``block-<what>`` exists and ``release-<what>`` does not."""
    # Files written by the test process: there is no event to wait on across processes.
    while (control / f"block-{what}").exists() and not (control / f"release-{what}").exists():  # noqa: ASYNC110
        await anyio.sleep(POLL_S)


# -- the downstream MCP server ----------------------------------------------------------------


def run_mcp(log: Path, control: Path) -> None:
    server: MCPServer = MCPServer("opspawn-counting", log_level="WARNING")

    async def received(tool: str, job: str, n: int, ctx: Context) -> None:
        meta = dict(ctx.request_context.meta or {})
        entry = {"src": "tool", "tool": tool, "job": job, "n": n, "args": {"job": job, "n": n}}
        entry.update(meta=meta, pid=os.getpid())
        before = _append(log, entry, {"src": "tool", "job": job, "n": n})
        if before == 0:
            await _hold(control, f"tool-{job}-{n}")

    def step_tool(tool: str, done: str) -> Callable[[str, int, Context], Awaitable[str]]:
        async def step(job: str, n: int, ctx: Context) -> str:
            await received(tool, job, n, ctx)
            return f"{done} {job}/{n}"

        return step

    # (name, what it answers, idempotent, description): the annotation is what the tests pin.
    for tool, done, idempotent, description in (
        (
            "record",
            "recorded",
            True,
            "Record that step n of job ran. Idempotent: running it again changes nothing.",
        ),
        ("charge", "charged", False, "Charge step n of job. NOT idempotent: running it again charges twice."),
    ):
        annotations = ToolAnnotations(
            read_only_hint=False, idempotent_hint=idempotent, destructive_hint=not idempotent
        )
        server.tool(name=tool, description=description, annotations=annotations)(step_tool(tool, done))

    @server.tool(description="Wait until the test releases the gate `name`, then return.")
    async def gate(name: str, ctx: Context) -> str:
        meta = dict(ctx.request_context.meta or {})
        _append(log, {"src": "tool", "tool": "gate", "job": name, "n": 0, "meta": meta, "pid": os.getpid()})
        while not (control / f"release-gate-{name}").exists():  # noqa: ASYNC110
            await anyio.sleep(POLL_S)
        return f"passed {name}"

    _append(log, {"src": "mcp-start", "pid": os.getpid(), "ppid": os.getppid()})
    server.run("stdio")


# -- the scripted LLM server ------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def scripted_reply(body: dict[str, Any]) -> dict[str, Any]:
    """The reply for a request (see the module docstring); pure, so any re-ask gets the same one."""
    messages: list[dict[str, Any]] = body.get("messages") or []
    user = next((_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
    found = GOAL.search(user)
    if found is None:
        return {"content": f"no job in the goal: {user!r}"}
    job, tools = found["job"], [t for t in found["tools"].split() if t != "nothing"]
    results = [_text(m.get("content")) for m in messages if m.get("role") == "tool"]
    k = len(results)
    if k < len(tools):
        offered = [t.get("function", {}).get("name", "") for t in body.get("tools") or []]
        name = next((n for n in offered if n.endswith(f"__{tools[k]}")), None)
        if name is None:
            return {"content": f"final: {job}: the tool {tools[k]!r} is not offered ({offered})"}
        call = {"name": name, "arguments": {"job": job, "n": k + 1}}
        return {"content": None, "tool_calls": [call]}
    return {"content": expected_result(job, *results)}


def rank(entry: dict[str, Any]) -> int:
    """Where a request sits in its task's run: model call k is 2k, tool call n is 2n - 1
    (llm0 < tool1 < llm1 < tool2 < ...). A run that never redoes finished work sends its
    requests in non-decreasing rank; only the call in flight at a crash may come twice in a row."""
    return 2 * int(entry["k"]) if entry["src"] == "llm" else 2 * int(entry["n"]) - 1


def run_llm(host: str, port: int, log: Path, control: Path, delay: float) -> None:
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import Response

    from tests.support.fake_openai import FakeOpenAI, Reply

    class CountingLLM(FakeOpenAI):
        def _next(self, body: dict[str, Any]) -> Reply | None:
            return scripted_reply(body)

        async def _chat(self, request: Request) -> Response:
            try:
                body = json.loads(await request.body())
                messages = body.get("messages") or []
            except (ValueError, AttributeError):
                return await super()._chat(request)
            user = next((_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
            found = GOAL.search(user)
            job = found["job"] if found else None
            results = [_text(m.get("content")) for m in messages if m.get("role") == "tool"]
            entry = {"src": "llm", "job": job, "k": len(results), "tool_results": results}
            before = _append(log, entry, {"src": "llm", "job": job, "k": len(results)})
            if before == 0 and job is not None:
                await _hold(control, f"llm-{job}-{len(results)}")
            if delay:
                await anyio.sleep(delay)
            return await super()._chat(request)

    fake = CountingLLM(mode="scripted", model="fake")
    uvicorn.run(fake.app, host=host, port=port, log_level="warning", lifespan="off", access_log=False)


@contextmanager
def spawn_counting_llm(log: Path, control: Path, *, delay: float = 0.0) -> Iterator[str]:
    """Run the counting LLM server in its own process (worker kills never touch it); yields its
    base_url. The process is killed on leaving (a blocked request may never end)."""
    from tests.servers.harness import free_port
    from tests.support.fake_openai import wait_for_http

    port = free_port()
    args = ["--port", str(port), "--log", str(log), "--control", str(control), "--delay", str(delay)]
    stderr = (log.parent / f"llm-{port}.stderr").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.counting_servers", "llm", *args],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )
    stderr.close()
    try:
        wait_for_http(
            proc,
            f"http://127.0.0.1:{port}/health",
            deadline_s=30,
            why=lambda: f"the counting LLM server did not start; see {stderr.name}",
        )
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.kill()
        proc.wait()


def mcp_server_entry(log: Path, control: Path, **settings: Any) -> dict[str, Any]:
    """The counting MCP server as an ``mcpServers`` entry (stdio), plus ``settings``
    (``timeout_s``, ``max_timeouts``, ``retry``...)."""
    return {
        "command": sys.executable,
        "args": ["-m", "tests.support.counting_servers", "mcp", "--log", str(log), "--control", str(control)],
        "cwd": str(Path(__file__).resolve().parents[2]),
        **settings,
    }


# -- reading the journal ----------------------------------------------------------------------


@dataclass(frozen=True)
class Journal:
    """The shared log file, read back: every request both servers received, in arrival order."""

    path: Path

    def entries(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def tool_calls(self, job: str | None = None, n: int | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.entries()
            if e["src"] == "tool" and (job is None or e["job"] == job) and (n is None or e["n"] == n)
        ]

    def llm_requests(self, job: str | None = None, k: int | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.entries()
            if e["src"] == "llm" and (job is None or e["job"] == job) and (k is None or e["k"] == k)
        ]

    def for_job(self, job: str) -> list[dict[str, Any]]:
        """The job's model and tool requests, in arrival order."""
        return [e for e in self.entries() if e["src"] in ("llm", "tool") and e.get("job") == job]

    def redone(self, job: str) -> list[str]:
        """Requests of ``job`` that came after the run had gone past them (finished work
        redone: a re-run from scratch, or a finished call repeated), e.g. ``["llm0 after tool1"]``."""
        out, highest, last = [], -1, ""
        for e in self.for_job(job):
            name = f"llm{e['k']}" if e["src"] == "llm" else f"tool{e['n']}"
            if rank(e) < highest:
                out.append(f"{name} after {last}")
            elif rank(e) > highest:
                highest, last = rank(e), name
        return out

    def keys(self, job: str, n: int) -> set[str | None]:
        """The idempotency keys the calls of step ``n`` of ``job`` carried."""
        return {idempotency_key(e.get("meta") or {}) for e in self.tool_calls(job, n)}

    def mcp_pids(self) -> list[int]:
        """Every downstream process started so far, in order."""
        return [e["pid"] for e in self.entries() if e["src"] == "mcp-start"]

    def counts(self, job: str) -> dict[str, int]:
        """``{"llm0": asked with 0 tool results, "llm1": ..., "tool1": calls of step 1, ...}``."""
        out: dict[str, int] = {}
        for e in self.entries():
            if e.get("job") != job:
                continue
            key = f"llm{e['k']}" if e["src"] == "llm" else f"tool{e['n']}" if e["src"] == "tool" else None
            if key is not None:
                out[key] = out.get(key, 0) + 1
        return out


def idempotency_key(meta: dict[str, Any]) -> str | None:
    """The idempotency key in a call's ``_meta``, whatever the exact key's prefix."""
    return next((str(v) for k, v in (meta or {}).items() if k.endswith("idempotency-key")), None)


@dataclass(frozen=True)
class Control:
    """The directory of block/release files both servers watch."""

    path: Path

    def block_llm(self, job: str, k: int) -> None:
        (self.path / f"block-llm-{job}-{k}").touch()

    def release_llm(self, job: str, k: int) -> None:
        (self.path / f"release-llm-{job}-{k}").touch()

    def block_tool(self, job: str, n: int) -> None:
        (self.path / f"block-tool-{job}-{n}").touch()

    def release_tool(self, job: str, n: int) -> None:
        (self.path / f"release-tool-{job}-{n}").touch()

    def release_gate(self, name: str) -> None:
        (self.path / f"release-gate-{name}").touch()

    def release_all(self) -> None:
        for block in self.path.glob("block-*"):
            (self.path / block.name.replace("block-", "release-", 1)).touch()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.counting_servers")
    sub = parser.add_subparsers(dest="which", required=True)
    mcp = sub.add_parser("mcp", help="the counting downstream MCP server, over stdio")
    llm = sub.add_parser("llm", help="the counting scripted LLM server, over HTTP")
    for p in (mcp, llm):
        p.add_argument("--log", required=True)
        p.add_argument("--control", required=True)
    llm.add_argument("--host", default="127.0.0.1")
    llm.add_argument("--port", type=int, required=True)
    llm.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    Path(args.control).mkdir(parents=True, exist_ok=True)
    if args.which == "mcp":
        run_mcp(Path(args.log), Path(args.control))
    else:
        run_llm(args.host, args.port, Path(args.log), Path(args.control), args.delay)


if __name__ == "__main__":
    main()
