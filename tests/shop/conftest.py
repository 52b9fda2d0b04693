"""The example shop running for real: a `celery worker` subprocess on the embedded
default, an SMTP sink, and each service's database in a temporary folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from celery_tx import TransactionCoordinator
from example_shop import settings
from example_shop.smtp_sink import SmtpSink

BALANCES = {"alice": 100_000, "bob": 1_000, "carol": 50_000}
STOCK = {"MUG": 50, "TEE": 2, "PEN": 10}


@dataclass
class RunningShop:
    """A worker serving the shop, and what its mail server received."""

    coordinator: TransactionCoordinator
    sink: SmtpSink
    log: Path

    def reset(self) -> None:
        """A fresh shop: the accounts in BALANCES and the stock in STOCK."""
        from example_shop.runtime import reset_shop

        reset_shop(BALANCES, STOCK)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        """Poll ``condition`` until it holds; fail with the worker's log otherwise."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; worker log:\n{self.log.read_text()[-5000:]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def running_shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningShop]:
    """The shop on the embedded default with one worker, for the tests of a module."""
    from example_shop.app import coordinator
    from example_shop.runtime import start_worker, stop_worker

    folder = tmp_path_factory.mktemp("shop")
    log = folder / "worker.log"
    with pytest.MonkeyPatch.context() as env, SmtpSink() as sink:
        for service in settings.SERVICES:
            url = f"sqlite:///{folder / service}.sqlite3"
            env.setenv(f"SHOP_{service.upper()}_DATABASE_URL", url)
        env.setenv("SHOP_SMTP_PORT", str(sink.port))
        # The worker must use the broker folder and journal this process uses.
        env.setenv("CELERY_TX_DATA_DIR", str(settings.data_dir()))
        shop = RunningShop(coordinator, sink, log)
        shop.reset()
        with log.open("w") as output:
            worker = start_worker(log=output, loglevel="INFO")
            try:
                yield shop
            finally:
                stop_worker(worker)
