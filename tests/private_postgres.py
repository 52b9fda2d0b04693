"""A PostgreSQL cluster of a test's own, on a free port, that the test may stop and start.

The shared server (127.0.0.1:5432) is never touched: a test that needs the journal's
database to go away runs ``initdb`` in a temporary folder and stops only that
cluster, by its own postmaster's pid. PostgreSQL refuses to run as root, so as
root the cluster belongs to, and runs as, the ``postgres`` user (``runuser``).
Without PostgreSQL's binaries the test is skipped locally and fails in CI.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import server_missing


def _bin_dir() -> Path:
    def version(initdb: str) -> tuple[int, ...]:
        return tuple(
            int(part) for part in Path(initdb).parent.parent.name.split(".") if part.isdigit()
        )

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        server_missing("PostgreSQL's binaries", FileNotFoundError("initdb"))
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivatePostgres:
    """``initdb`` in a temporary folder; ``start()``, ``stop()``, ``url``, ``close()``."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.folder = Path(tempfile.mkdtemp(prefix="celery_tx_pg_"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                server_missing("a 'postgres' user to run a private PostgreSQL as", exc)
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.folder}'\nfsync = off\n"
                "max_connections = 50\nshared_buffers = 16MB\n"
            )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bin / program), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        log = str(self.folder / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", "60", "start")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        """Stop it as a crash does: ``pg_ctl -m immediate`` (SIGQUIT to this cluster's own
        postmaster, the pid in its ``postmaster.pid``): every connection dropped, no
        checkpoint. Returns once it is gone."""
        if self.postmaster_pid() is not None:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def close(self) -> None:
        """Stop it if it runs, and remove its folder."""
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
