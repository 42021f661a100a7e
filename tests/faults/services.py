"""Private RabbitMQ and PostgreSQL instances that a fault test may stop and start at will.

The shared services on 5432/5672 serve other test runs at the same time, so an outage test
never touches them: it starts its own RabbitMQ node (own node name, ports, data and log dirs, no
plugins, its own config file so the system one's listener on 5672 does not apply) or its own
PostgreSQL cluster (initdb as the ``postgres`` user: initdb refuses root), and removes it after.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.support.services import require_command, unavailable

PG_BIN = Path(os.environ.get("OPSPAWN_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def restartable_port(*taken: int) -> int:
    """A free port below the kernel's ephemeral range, for a service a test stops and starts.

    A port the kernel handed out (``bind(0)``) lies in the ephemeral range, where any outgoing
    connection may take it as its source port while the service is down; the restart then fails
    with ``eaddrinuse``. Below the range only an explicit bind can take it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 10_000), low))
    random.shuffle(candidates)
    for port in [p for p in candidates if p not in taken][:200]:
        with socket.socket() as sock, suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free port below the ephemeral range (which starts at {low})")


@dataclass
class PrivateRabbit:
    node: str
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return _run(["rabbitmqctl", "-n", self.node, *args], env=self.env, timeout=timeout)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")


@contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of the test's own: ``stop_app``/``start_app`` touch nobody else.

    Run as root, the ``rabbitmq-server``/``rabbitmqctl`` wrappers switch to the ``rabbitmq``
    user, so the node's directories are made outside pytest's (root-only) tmp_path and given to
    that user; its crash dump goes there too, never into the system node's home.
    """
    require_command("rabbitmq-server")
    require_command("rabbitmqctl")
    base = Path(tempfile.mkdtemp(prefix="opspawn-fault-rmq-"))
    base.chmod(0o755)
    node = f"opspawn-fault-{uuid.uuid4().hex[:8]}@localhost"
    port = restartable_port()
    dist = restartable_port(port)
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n", encoding="utf-8"
    )
    (base / "rabbitmq-env.conf").write_text("", encoding="utf-8")
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),
    }
    if os.geteuid() == 0:
        for path in (base, *base.iterdir()):
            shutil.chown(path, "rabbitmq")
    rabbit = PrivateRabbit(node, port, env)
    try:
        _run(["rabbitmq-server", "-detached"], env=env)
        # -detached returns before the node registers with epmd: until then await_startup says
        # "not running at all", so it is retried, with a hang guard.
        deadline = time.monotonic() + 120
        while True:
            try:
                rabbit.ctl("await_startup", timeout=120)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        _stop_rabbit(rabbit)
        shutil.rmtree(base, ignore_errors=True)
        unavailable(f"a private RabbitMQ node ({exc})")
    try:
        yield rabbit
    finally:
        _stop_rabbit(rabbit)
        shutil.rmtree(base, ignore_errors=True)


def _stop_rabbit(rabbit: PrivateRabbit) -> None:
    with suppress(RuntimeError, subprocess.TimeoutExpired):
        rabbit.ctl("stop", timeout=120)
    pid_file = Path(rabbit.env["RABBITMQ_PID_FILE"])
    with suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), 9)  # only if `stop` failed: it is gone otherwise


@dataclass
class PrivatePostgres:
    data: Path
    sockets: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/test"

    def _pg_ctl(self, *args: str) -> None:
        _run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args))

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-w", "-l", str(self.data.parent / "postgres.log"), "-o", options, "start")

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")


def _as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of the test's own (trust auth, database ``test``)."""
    if not (PG_BIN / "initdb").exists():
        unavailable(f"PostgreSQL binaries in {PG_BIN}")
    # Not under pytest's tmp_path: that is root's, mode 0700, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="opspawn-fault-pg-"))
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    base.chmod(0o755)
    pg = PrivatePostgres(data, sockets, restartable_port())
    started = False
    try:
        _run(
            _as_postgres(
                str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
            )
        )
        pg.start()
        started = True
        _run(
            _as_postgres(
                str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "test"
            )
        )
        yield pg
    finally:
        if started:
            with suppress(RuntimeError):
                pg.stop()
        shutil.rmtree(base, ignore_errors=True)
