"""The embedded broker: whole messages only, each consumed once, across processes.

kombu's own filesystem transport lets a consumer read a message its producer is
still writing (an empty payload stops the worker). Here two producer processes
and two consumer processes race on one folder at a 1 ms polling interval.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PER_PRODUCER = 300

_SCRIPT = """
import json, sys, time
from kombu import Connection
role, folder, ident, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = {"data_folder_in": folder, "data_folder_out": folder,
           "control_folder": folder, "polling_interval": 0.001}
with Connection("filesystem://", transport="celery_tx.drivers.celery_tasks.filesystem:Transport",
                transport_options=options) as conn:
    queue = conn.SimpleQueue("race")
    if role == "produce":
        for i in range(count):
            queue.put({"producer": ident, "n": i, "pad": "x" * 4000})
    elif role == "stop":  # one per consumer, once every producer is done
        for _ in range(count):
            queue.put({"stop": True})
    else:
        # Until a stop: on a loaded machine a producer may start late, and an
        # idle timeout would end a consumer before its messages came.
        got, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                message = queue.get(timeout=0.05)
            except queue.Empty:
                continue
            message.ack()
            if message.payload.get("stop"):
                break
            got.append([message.payload["producer"], message.payload["n"]])
        print(json.dumps(got))
"""


@pytest.mark.slow
def test_racing_producers_and_consumers_get_every_message_once(tmp_path: Path) -> None:
    """600 messages from 2 producers reach 2 consumers whole, each exactly once; each
    consumer stops at a stop message put after them, however late they came."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}

    def start(role: str, ident: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-c", _SCRIPT, role, str(tmp_path), ident, str(PER_PRODUCER)]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)

    consumers = [start("consume", f"c{i}") for i in range(2)]
    producers = [start("produce", f"p{i}") for i in range(2)]
    for producer in producers:
        assert producer.wait(timeout=120) == 0
    # Messages are taken in the order they were put: the stops come after every one.
    stop = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "stop", str(tmp_path), "stop", str(len(consumers))],
        env=env,
        timeout=120,
        check=False,
    )
    assert stop.returncode == 0
    received = []
    for consumer in consumers:
        out, _ = consumer.communicate(timeout=120)
        assert consumer.returncode == 0
        received += [tuple(m) for m in json.loads(out)]
    expected = {(f"p{p}", n) for p in range(2) for n in range(PER_PRODUCER)}
    assert sorted(received) == sorted(expected), "every message once, none lost or doubled"
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".exchange")]
    assert not left, "nothing left half-written or claimed"
