"""``python -m example_shop serve``: the shop, its worker and its mail sink from one
command, as a newcomer runs it; the README's requests work; Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from example_shop.runtime import PROJECT_ROOT

pytestmark = [pytest.mark.slow]
WAIT = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    children = [int(line) for line in found.stdout.split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def _final_order(shop: str, order_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    order: dict[str, Any] = {}
    while True:
        try:  # 404 until the orders service's step has created it
            with urllib.request.urlopen(f"{shop}/orders/{order_id}", timeout=10) as response:
                order = json.loads(response.read())
        except urllib.error.HTTPError as missing:
            if missing.code != 404:
                raise
        if order.get("status") in ("CONFIRMED", "CANCELLED"):
            return order
        assert time.monotonic() < deadline, order
        time.sleep(0.2)


def test_one_command_runs_the_shop_and_ctrl_c_stops_it_all(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SHOP_"))}
    env.update(CELERY_TX_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(PROJECT_ROOT))
    serve = subprocess.Popen(
        [sys.executable, "-m", "example_shop", "serve", "--port", str(port), "--smtp-port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a terminal's process group, which Ctrl-C signals whole
    )
    assert serve.stdout is not None
    lines: list[str] = []
    try:
        while not any("Ctrl-C stops everything" in line for line in lines):
            line = serve.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        text = "".join(lines)
        shop = f"http://127.0.0.1:{port}"
        assert f"shop:          {shop}/" in text
        assert f"transactions:  {shop}/transactions/" in text
        assert re.search(r"mail sink: +127\.0\.0\.1:\d+", text)
        # The requests it prints, as printed.
        bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*\})'", text)]
        assert len(bodies) == 3
        deadline = time.monotonic() + WAIT
        while True:  # the web app may still be starting
            try:
                urllib.request.urlopen(shop + "/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the web app never answered"
                time.sleep(0.2)
        committed, rolled_back, refused = (_post(f"{shop}/orders", body) for body in bodies)
        assert committed[0] == 202, committed
        assert rolled_back[0] == 202, rolled_back
        assert refused[0] == 400, refused
        assert refused[1]["error"] == "InvalidOrder"
        confirmed = _final_order(shop, committed[1]["order_id"])
        cancelled = _final_order(shop, rolled_back[1]["order_id"])
        assert confirmed["status"] == "CONFIRMED"  # the mail sink took its email
        assert cancelled["status"] == "CANCELLED"
        assert "InsufficientFunds" in cancelled["transaction"]["error"]
        with urllib.request.urlopen(f"{shop}/", timeout=10) as response:
            page = response.read().decode()
        assert f"/transactions/{committed[1]['transaction_id']}" in page
        children = _descendants(serve.pid)
        assert len(children) >= 3  # the web app, the worker and its pool
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C: the terminal signals its process group
        try:
            rest = serve.communicate(timeout=WAIT)[0]
        except subprocess.TimeoutExpired:
            serve.kill()
            rest = serve.communicate()[0]
    assert serve.returncode == 0, "".join(lines) + rest
    assert "stopped." in rest
    assert "did not stop by itself" not in rest  # a warm shutdown, not a kill
    time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert alive == [], f"still running after Ctrl-C: {alive}"


def test_a_taken_port_is_refused_before_anything_starts_or_is_reset(tmp_path: Path) -> None:
    """A second `serve` on the first one's port: exit 1 saying so, and the running
    shop's data untouched (nothing reset, no worker started)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "SHOP_"))}
        env.update(CELERY_TX_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(PROJECT_ROOT))
        result = subprocess.run(
            [sys.executable, "-m", "example_shop", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {port} is taken" in result.stderr
    assert not (tmp_path / "data" / "shop").exists()  # no shop database was reset
    assert not (tmp_path / "data" / "shop-worker.log").exists()  # no worker was started
