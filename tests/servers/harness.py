"""Running the testing server for real: stdio configs, HTTP server processes on free ports, polling.

Nothing here is a stand-in: the stdio configs start real child processes through the pool, and
``HttpServer`` runs the testing server under uvicorn on 127.0.0.1 in its own process, which a test
can kill and restart on the same port to play a dropped HTTP server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal, Self

import anyio
import anyio.abc

from opspawn_mcp.config import HttpServerConfig, StdioServerConfig
from tests.support.services import require_command

REPO_ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 60.0
"""Deadline for polling loops: only there to turn a hang into a failure, never a timing assertion."""


def opspawn_command() -> str:
    """The ``opspawn-mcp`` of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "opspawn-mcp"
    return str(beside) if beside.exists() else require_command("opspawn-mcp")


@contextlib.contextmanager
def opspawn_process(
    *args: str, cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``opspawn-mcp *args`` in its own session, its output in ``log``. On leaving: SIGINT (what
    Ctrl-C sends) and a wait; its whole group is killed only if it hangs past the hang guard."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [opspawn_command(), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until_serving(
    proc: subprocess.Popen[bytes],
    log: Path,
    ready: Callable[[], bool],
    not_yet: tuple[type[Exception], ...],
) -> None:
    """Poll another process's probe until ``ready()`` is true (False, or one of the ``not_yet``
    errors of its transport, means not yet); its exit or the hang guard is a failure showing the
    end of its ``log``."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(*not_yet):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the process never became ready: {log.read_text()[-3000:]}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stdio_config(
    tmp_path: Path,
    *extra_args: str,
    timeout_s: float = 30.0,
    max_concurrency: int = 16,
    env: dict[str, str] | None = None,
) -> StdioServerConfig:
    """The testing server over stdio; it logs its pid to ``tmp_path/pids`` and cancels to ``cancels``."""
    return StdioServerConfig(
        command=sys.executable,
        args=[
            "-m",
            "tests.servers.testing_server",
            "--pid-log",
            str(tmp_path / "pids"),
            "--cancel-file",
            str(tmp_path / "cancels"),
            *extra_args,
        ],
        cwd=str(REPO_ROOT),
        env=env or {},
        timeout_s=timeout_s,
        max_concurrency=max_concurrency,
    )


def lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError:
        return []


def started_pids(tmp_path: Path) -> list[int]:
    return [int(line) for line in lines(tmp_path / "pids")]


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists at all, zombie included: a zombie is a child nobody reaped."""
    return Path(f"/proc/{pid}").exists()


async def wait_until(predicate: Callable[[], bool], what: str, deadline_s: float = HANG_GUARD_S) -> None:
    """Poll state owned by another process (a file, /proc) or the pool; no event exists for it."""
    with anyio.fail_after(deadline_s):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)
    assert predicate(), what


async def wait_until_async(
    predicate: Callable[[], Awaitable[bool]], deadline_s: float = HANG_GUARD_S
) -> None:
    with anyio.fail_after(deadline_s):
        while not await predicate():  # noqa: ASYNC110
            await anyio.sleep(0.05)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class HttpServer:
    """The testing server as a separate uvicorn process; ``async with`` starts and stops it."""

    def __init__(
        self,
        transport: Literal["sse", "streamable-http"],
        tmp_path: Path,
        *,
        command: list[str] | None = None,
        port: int | None = None,
        path: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.transport = transport
        self.tmp_path = tmp_path
        self.port = port or free_port()
        self._command = command
        self._path = path or ("/sse" if transport == "sse" else "/mcp")
        self._env = env
        self.process: anyio.abc.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self._path}"

    def config(self, *, timeout_s: float = 30.0, headers: dict[str, str] | None = None) -> HttpServerConfig:
        return HttpServerConfig(
            url=self.url, transport=self.transport, timeout_s=timeout_s, headers=headers or {}
        )

    async def start(self) -> None:
        command = self._command or [
            sys.executable,
            "-m",
            "tests.servers.testing_server",
            "--transport",
            self.transport,
            "--port",
            str(self.port),
            "--pid-log",
            str(self.tmp_path / "pids"),
            "--cancel-file",
            str(self.tmp_path / "cancels"),
        ]
        log = (self.tmp_path / f"http-server-{self.port}.log").open("ab")
        self.process = await anyio.open_process(
            command,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **(self._env or {})},
            start_new_session=True,
        )
        log.close()
        process = self.process
        with anyio.fail_after(HANG_GUARD_S):
            while not await anyio.to_thread.run_sync(_port_open, self.port):
                if process.returncode is not None:
                    raise RuntimeError(f"{command} exited with {process.returncode}; see {log.name}")
                await anyio.sleep(0.05)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            # The whole group: `npx` runs the real server as its child.
            _signal_group(process.pid, signal.SIGTERM)
            with anyio.move_on_after(10):
                await process.wait()
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
            await process.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
