"""The demo as a user runs it: `python -m example_shop demo`, in a subprocess, with its
summary and its invariant check (exit code 0 only when the shop is consistent)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kombu import Connection

from example_shop.app import ALL_QUEUES
from example_shop.runtime import PROJECT_ROOT, start_worker, stop_worker
from tests.conftest import truncate_journal
from tests.stacks import AMQP_URL, REDIS_URL, _check_rabbitmq, _check_redis


def _run_demo(
    env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the demo in a process group of its own: on a timeout its worker dies with it."""
    command = [sys.executable, "-m", "example_shop", "demo", *args]
    with subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as demo:
        try:
            stdout, stderr = demo.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            stdout, stderr = demo.communicate()
            pytest.fail(f"the demo took over {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, demo.returncode, stdout, stderr)


def _clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SHOP_"))}
    env["CELERY_TX_DATA_DIR"] = str(data_dir)
    return env


def _assert_consistent(result: subprocess.CompletedProcess[str], orders: int) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "all invariants hold" in result.stdout
    assert f"{orders} orders in" in result.stdout
    # A realistic mix: every kind of outcome happened, and only business rules
    # rolled orders back (a deadlock or a lost connection would show up here).
    for outcome in ("committed", "InsufficientFunds", "OutOfStock", "EmailRefused"):
        assert outcome in result.stdout
    reasons = re.findall(r"^rolled back: (\w+)", result.stdout, flags=re.MULTILINE)
    assert set(reasons) == {"InsufficientFunds", "OutOfStock", "EmailRefused"}, result.stdout
    assert re.search(r"^failed +0$", result.stdout, flags=re.MULTILINE), result.stdout


@pytest.mark.slow
def test_the_demo_keeps_the_invariants_on_the_embedded_default(tmp_path: Path):
    result = _run_demo(_clean_env(tmp_path), "--orders", "150", "--concurrency", "6")
    _assert_consistent(result, 150)


@pytest.mark.slow
def test_two_demos_at_once_beside_a_running_shop_worker_all_keep_the_invariants(tmp_path: Path):
    """From one folder, as a newcomer does: a shop worker on the default data folder
    (the README's shop section), then two demos at once. Each demo runs in a data
    folder and on queues of its own, so neither the worker nor the other demo
    takes its orders; each ends naming a rolled-back order and how to look at it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SHOP_"))}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    shop = start_worker({**env, "CELERY_TX_DATA_DIR": str(tmp_path / ".celery_tx")})
    try:
        command = [sys.executable, "-m", "example_shop", "demo", "--orders", "60"]
        demos = [
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for _ in range(2)
        ]
        results = []
        for demo in demos:
            try:
                stdout, stderr = demo.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                stdout, stderr = demo.communicate()
            results.append((demo.returncode, stdout, stderr))
    finally:
        stop_worker(shop)
    journals = set()
    for returncode, stdout, stderr in results:
        assert returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "all invariants hold" in stdout
        journals.add(re.search(r"^journal: (.*)$", stdout, flags=re.MULTILINE).group(1))
        rolled_back = re.search(r"a rolled-back order: transaction ([0-9a-f-]{36})", stdout)
        assert rolled_back is not None, stdout
        assert f"tx show {rolled_back.group(1)}" in stdout
        assert "tx list --status ROLLED_BACK" in stdout
        assert f"/transactions/{rolled_back.group(1)}" in stdout
    assert len(journals) == 2  # two runs, two folders
    assert all(".celery_tx/demo-runs/" in journal for journal in journals)


@pytest.mark.slow
@pytest.mark.celery_servers
# RabbitMQ + PostgreSQL runs the same demo under chaos (test_chaos.py).
@pytest.mark.parametrize("broker", ["redis"])
def test_the_demo_keeps_the_invariants_on_a_broker_and_postgres(
    tmp_path: Path, postgres_url: str, broker: str
):
    truncate_journal(postgres_url)
    env = _clean_env(tmp_path)
    env["CELERY_BROKER_URL"] = REDIS_URL if broker == "redis" else AMQP_URL
    env["CELERY_TX_DATABASE_URL"] = postgres_url
    env["SHOP_DATABASE_URL"] = postgres_url
    (_check_redis if broker == "redis" else _check_rabbitmq)()
    _empty_queues(env["CELERY_BROKER_URL"])
    try:
        result = _run_demo(env, "--orders", "150", "--concurrency", "8")
    finally:
        _empty_queues(env["CELERY_BROKER_URL"])
    _assert_consistent(result, 150)
    assert env["CELERY_BROKER_URL"].split(":")[0] + "://" in result.stdout


def _empty_queues(broker_url: str) -> None:
    """No message of another run may reach this run's worker, nor outlive it."""
    with Connection(broker_url) as connection:
        channel = connection.default_channel
        for queue in ALL_QUEUES.split(","):
            try:
                channel.queue_purge(queue)
            except Exception:  # kombu raises per transport for a queue never declared
                channel = connection.channel()


def test_bad_arguments_exit_2_with_usage(tmp_path: Path):
    env = _clean_env(tmp_path)
    for args in (("--orders", "0"), ("--orders", "many"), ("--bogus",)):
        result = _run_demo(env, *args, timeout=60)
        assert result.returncode == 2
        assert "usage:" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "example_shop", "nonsense"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr
