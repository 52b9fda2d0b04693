"""A Redis server or RabbitMQ node of a test's own, on free ports, that the test may restart.

The shared brokers (Redis on 6379, RabbitMQ on 5672) are never touched: a test
that needs its broker to go away starts one of these in a temporary folder and
stops only that, by the pid of the process it started (its own process group).
A restart keeps the data folder and the port, as a real restart does: Redis
appends every write to its append-only file (fsynced at once), and RabbitMQ
keeps its mnesia folder, so durable queues and persistent messages come back.
Without the servers' programs the test is skipped locally and fails in CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import server_missing

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _PrivateServer:
    """A server process in a session of its own, started and killed by pid."""

    name = "server"

    def __init__(self, prefix: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until it answers."""
        assert self.process is None or self.process.poll() is not None, "already running"
        command, env = self._command()
        with (self.folder / f"{self.name}.out").open("ab") as output:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=self.folder,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: killed whole, and only it
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"private {self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill it as a crash does (SIGKILL to its own process group), and wait until it
        is gone: every client connection drops at once."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)

    def restart(self, down: float = 3.0) -> None:
        """Kill it, stay down ``down`` seconds, start it again on the same port and data."""
        self.stop()
        time.sleep(down)
        self.start()
        self.restarts += 1

    def log_tail(self) -> str:
        return (
            "".join(
                path.read_text(errors="replace")[-3000:]
                for path in sorted(self.folder.glob("**/*.log"))
            )
            + (self.folder / f"{self.name}.out").read_text(errors="replace")[-3000:]
        )

    def close(self) -> None:
        """Stop it if it runs, and remove its folder."""
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class PrivateRedis(_PrivateServer):
    """``redis-server`` on 127.0.0.1 and a free port, its data in a temporary folder."""

    name = "redis"

    def __init__(self) -> None:
        self.program = shutil.which("redis-server")
        if self.program is None:
            server_missing("redis-server", FileNotFoundError("redis-server"))
        super().__init__("celery_tx_redis_")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        assert self.program is not None
        return [
            self.program,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", ""),
            *("--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")),
            # Every write kept at once, as a production Redis that must not lose
            # queued messages is configured; no snapshots.
            *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
            *("--daemonize", "no"),
        ], dict(os.environ)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class PrivateRabbitMQ(_PrivateServer):
    """A RabbitMQ node of its own: its own node name, AMQP and distribution ports,
    mnesia and log folders and Erlang cookie, no plugins and no configuration
    file of the machine's; it listens on 127.0.0.1 only. Started by running the
    server script directly (``/usr/sbin/rabbitmq-server`` would read the shared
    node's ``/etc/rabbitmq`` environment and switch to its user)."""

    name = "rabbitmq"

    def __init__(self) -> None:
        if not RABBITMQ_SERVER.exists() or shutil.which("erl") is None:
            server_missing("RabbitMQ's server", FileNotFoundError(str(RABBITMQ_SERVER)))
        super().__init__("celery_tx_rabbitmq_")
        self.dist_port = free_port()
        self.node = f"celery_tx_{self.port}@localhost"
        (self.folder / "home").mkdir()
        (self.folder / "enabled_plugins").write_text("")
        (self.folder / "rabbitmq-env.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        folder = self.folder
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(folder / "home"),  # its own Erlang cookie
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            # Else the port plus 20000: maybe the shared node's.
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(folder / "mnesia"),  # kept across restarts
            RABBITMQ_LOG_BASE=str(folder / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(folder / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(folder / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(folder / "rabbitmq"),  # absent: the defaults
            RABBITMQ_ADVANCED_CONFIG_FILE=str(folder / "advanced.config"),
            RABBITMQ_PID_FILE=str(folder / "rabbitmq.pid"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(folder / "plugins-expand"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return [str(RABBITMQ_SERVER)], env

    def _answers(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1) as conn:
                conn.ensure_connection(max_retries=1)
        except Exception:  # kombu raises several types for a refused connection
            return False
        return True
