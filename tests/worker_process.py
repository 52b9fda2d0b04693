"""A real `celery worker` subprocess on the project's celeryconfig.py, on a queue of its own.

The worker reads its servers from the environment (``Stack.worker_env``) and
consumes only ``queue``: the transactions sent to it name that queue in their
signatures (``.set(queue=...)``, journaled with them), so every action and
compensation, whoever sends it, goes there and never to a queue another
process (a benchmark, another test) reads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.stacks import Stack

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerProcess:
    """A worker subprocess (its own process group) and its log."""

    process: subprocess.Popen[bytes]
    log: Path

    def pool_processes(self) -> list[int]:
        """The pids of the worker's pool processes now."""
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in found.stdout.split()]

    def kill_pool_process(self, pid: int) -> None:
        """SIGKILL ``pid``, which must be one of this worker's pool processes."""
        assert pid in self.pool_processes(), (pid, self.pool_processes(), self.log_text())
        os.kill(pid, signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@contextmanager
def worker_process(
    stack: Stack,
    folder: Path,
    *,
    queue: str,
    includes: tuple[str, ...] = (),
    concurrency: int = 1,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[WorkerProcess]:
    """`celery -A tests.apps.embedded worker -P prefork -Q queue` on the stack's servers."""
    log = folder / "worker.log"
    environment = {**stack.worker_env(), "PYTHONPATH": str(ROOT), **(env or {})}
    command = [
        *(sys.executable, "-m", "celery", "-A", "tests.apps.embedded", "worker"),
        *("-P", "prefork", "-c", str(concurrency), "-Q", queue, "--loglevel=INFO"),
        *("--without-heartbeat", "--without-gossip", "--without-mingle"),
        *(arg for module in includes for arg in ("-I", module)),
        *extra,
    ]
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            env=environment,
            cwd=folder,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: nothing of it outlives the test
        )
    try:
        yield WorkerProcess(process, log)
    finally:
        if process.poll() is None:
            process.terminate()  # warm shutdown: nothing is running by now
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Pool processes of a worker that died abruptly: only those of its group.
        time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, log: WorkerProcess | None = None
) -> None:
    """Poll ``condition`` every 20 ms; after ``timeout`` s fail, saying ``what`` (and the log)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = f"\n{log.log_text()}" if log is not None else ""
            raise AssertionError(f"timed out waiting for {what}{tail}")
        time.sleep(0.02)
