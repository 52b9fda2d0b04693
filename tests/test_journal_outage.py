"""The journal's database going away for real: a TCP proxy in front of PostgreSQL
is closed (every connection reset, new ones refused), then opened again."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from celery_tx import JournalUnavailable, TransactionCoordinator, TxStatus
from celery_tx.core.outcome import Outcome
from tests.apps import tasks
from tests.participants import Recorder
from tests.stacks import filesystem_sender

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Outage:
    """A TCP proxy to PostgreSQL (``upstream``: host and port) on a port of its own;
    ``down()`` and ``up()``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset every open one, as a dead server does."""
        assert self._listener is not None
        # shutdown() wakes the thread blocked in accept(); close() alone would
        # leave the socket listening under it (Linux).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the outage began
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def outage(postgres_url: str) -> Iterator[tuple[Outage, str]]:
    """The proxy, up, and the test database's URL through it."""
    from tests.conftest import truncate_journal

    truncate_journal(postgres_url)
    database = sa.make_url(postgres_url)  # the configured test database, wherever it is
    proxy = Outage((database.host or "127.0.0.1", database.port or 5432))
    proxy.up()
    url = database.set(host="127.0.0.1", port=proxy.port)
    yield proxy, url.render_as_string(hide_password=False)
    with contextlib.suppress(AssertionError, OSError):
        proxy.down()


def test_a_database_down_at_commit_runs_nothing_and_the_commit_can_be_repeated(outage):
    proxy, url = outage
    recorder = Recorder()
    with TransactionCoordinator(url) as coordinator:
        coordinator._journal.patience = 1.0  # the test need not wait 30 s to give up
        tx_id = coordinator.begin_transaction()
        for name in ("a", "b"):
            coordinator.register_participant(tx_id, name, *recorder.participant(name))
        proxy.down()
        with pytest.raises(JournalUnavailable):
            coordinator.commit_transaction(tx_id)
        assert recorder.calls == []  # nothing ran without the journal
        proxy.up()
        assert coordinator.get_transaction(tx_id).status is TxStatus.PENDING
        outcome = coordinator.commit_transaction(tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert recorder.calls == [("a", "commit"), ("b", "commit")]


def test_a_database_down_at_a_celery_commit_sends_nothing(outage, tmp_path: Path):
    proxy, url = outage
    app = filesystem_sender(tmp_path, celery_tx_database_url=url)
    queue = tmp_path / "broker"
    with TransactionCoordinator(app=app) as coordinator:
        coordinator._journal.patience = 1.0
        tx_id = coordinator.begin_transaction()
        coordinator.register_participant(tx_id, "a", tasks.step.s(str(tmp_path / "e"), "a"))
        proxy.down()
        with pytest.raises(JournalUnavailable):
            coordinator.commit_transaction_async(tx_id)
        assert list(queue.iterdir()) == []  # no message: no worker can act on it
        proxy.up()
        assert coordinator.get_transaction(tx_id).status is TxStatus.PENDING
        coordinator.commit_transaction_async(tx_id)  # repeatable once it is back
        assert len(list(queue.iterdir())) == 1
        assert coordinator.get_transaction(tx_id).status is TxStatus.RUNNING


@pytest.mark.parametrize("through", ["the driver", "SQLAlchemy"])
def test_a_database_gone_is_a_journal_outage_on_every_path(outage, through: str) -> None:
    """With the server gone (pooled connections reset, new ones refused), reads and
    writes raise JournalUnavailable once their patience runs out, whether they go
    straight through the driver or, instrumented, through SQLAlchemy; and they work
    again once it is back."""
    from celery_tx.store import Journal

    proxy, url = outage
    journal = Journal(url, patience=0.5)
    listening = through == "SQLAlchemy"

    def counted(*_: object) -> None:
        """A statement listener: the journal then sends through SQLAlchemy."""

    try:
        assert journal.load(uuid.uuid4()) is None  # the schema, and pooled connections
        if listening:
            for engine in journal.engines:
                sa.event.listen(engine, "before_cursor_execute", counted)
        tx = Outcome(id=uuid.uuid4(), name="o", status=TxStatus.RUNNING, created_at=NOW)
        proxy.down()
        with pytest.raises(JournalUnavailable, match="unavailable") as raised:
            journal.load(tx.id)
        assert raised.value.transient
        with pytest.raises(JournalUnavailable, match="unavailable"):
            journal.create(tx, durable=True)
        proxy.up()
        journal.create(tx, durable=True)
        assert journal.get(tx.id) == tx
    finally:
        if listening:
            for engine in journal.engines:
                sa.event.remove(engine, "before_cursor_execute", counted)
        journal.close()
