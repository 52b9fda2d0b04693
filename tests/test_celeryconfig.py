"""celeryconfig.py: the embedded default needs no server, and real workers use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, **env: str) -> dict[str, object]:
    """celeryconfig's settings as a fresh process with ``env`` sees them."""
    script = (
        "import json, celeryconfig as c\n"
        "names = [k for k in dir(c) if not k.startswith('_')]\n"
        "print(json.dumps({k: getattr(c, k) for k in names}, default=str))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_embedded_default_needs_no_server(tmp_path: Path) -> None:
    """With nothing set: filesystem broker in ./.celery_tx, SQLite journal, safe worker defaults."""
    config = _config(tmp_path)
    assert config["broker_url"] == "filesystem://"
    assert config["result_backend"] is None
    assert (
        config["celery_tx_database_url"]
        == f"sqlite:///{tmp_path / '.celery_tx' / 'journal.sqlite3'}"
    )
    options = config["broker_transport_options"]
    assert isinstance(options, dict)
    assert options["data_folder_in"] == options["data_folder_out"]
    assert Path(options["data_folder_in"]).is_dir()
    assert Path(options["control_folder"]).is_dir()
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["worker_send_task_events"] is True


def test_environment_chooses_the_servers(tmp_path: Path) -> None:
    """CELERY_BROKER_URL, CELERY_RESULT_BACKEND and CELERY_TX_DATABASE_URL are used as given."""
    config = _config(
        tmp_path,
        CELERY_BROKER_URL="redis://127.0.0.1:6379/0",
        CELERY_RESULT_BACKEND="redis://127.0.0.1:6379/1",
        CELERY_TX_DATABASE_URL="postgresql://postgres@127.0.0.1/test",
    )
    assert config["broker_url"] == "redis://127.0.0.1:6379/0"
    assert config["result_backend"] == "redis://127.0.0.1:6379/1"
    assert config["celery_tx_database_url"] == "postgresql://postgres@127.0.0.1/test"
    assert config["broker_transport_options"] == {"visibility_timeout": 3600}
    # kombu's Redis transport with the fix that keeps a worker alive across a restart.
    assert config["broker_transport"] == "celery_tx.drivers.celery_tasks.redis_broker:Transport"
    assert not (tmp_path / ".celery_tx").exists()
    amqp = _config(tmp_path, CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//")
    assert "broker_transport" not in amqp  # kombu's own, from the URL


@pytest.mark.slow
def test_a_real_worker_runs_tasks_sent_by_another_process(tmp_path: Path) -> None:
    """A `celery worker` subprocess on the embedded default runs what another process sends."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CELERY_TX_DATA_DIR": str(tmp_path / "data")}
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_TX_DATABASE_URL"):
        env.pop(key, None)
    effects = tmp_path / "effects.txt"
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.embedded",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        send = (
            "import sys\nfrom tests.apps.embedded import touch\n"
            "for i in range(5): touch.delay(sys.argv[1], f'task {i}')\n"
        )
        subprocess.run(
            [sys.executable, "-c", send, str(effects)],
            env=env,
            cwd=tmp_path,
            check=True,
            timeout=60,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if effects.exists() and len(effects.read_text().splitlines()) == 5:
                break
            time.sleep(0.2)
        lines = sorted(effects.read_text().splitlines()) if effects.exists() else []
        worker_log = (tmp_path / "worker.log").read_text()
        assert lines == [f"task {i}" for i in range(5)], worker_log
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()


def test_the_sweeps_are_configured_from_the_environment(tmp_path: Path) -> None:
    """Each worker's sweep interval, the stall time and a default deadline."""
    default = _config(tmp_path)
    assert default["celery_tx_sweep_interval"] == 30
    assert default["celery_tx_stalled_after"] == 300
    assert default["celery_tx_default_timeout"] is None
    chosen = _config(
        tmp_path,
        CELERY_TX_SWEEP_INTERVAL="0",
        CELERY_TX_STALLED_AFTER="60",
        CELERY_TX_DEFAULT_TIMEOUT="120",
    )
    assert chosen["celery_tx_sweep_interval"] == 0
    assert chosen["celery_tx_stalled_after"] == 60
    assert chosen["celery_tx_default_timeout"] == 120
