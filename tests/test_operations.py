"""The operators' coordinator calls beyond the CLI's: exact statistics, bad arguments."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from celery_tx import InvalidArgument, ParticipantNotResolvable, TransactionCoordinator, TxStatus
from celery_tx.core import transitions as tr
from tests.journaled import journal_started

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _finished(c: TransactionCoordinator, name: str, seconds: float, status: TxStatus) -> None:
    """A transaction of one step whose commit took exactly ``seconds``."""
    tx_id = c.begin_transaction(name=name)
    c.register_participant(tx_id, "step", print, print)
    end = T0 + timedelta(seconds=seconds)

    def run(t):  # type: ignore[no-untyped-def]
        t = tr.start_action(tr.start_commit(t, T0), 0, T0)
        if status is TxStatus.COMMITTED:
            return tr.finish_action(t, 0, None, end)
        t = tr.fail_action(t, 0, "Boom", T0)
        t = tr.start_compensation(t, 0, T0)
        return tr.finish_compensation(t, 0, end)

    with c._pending.ending(c._journal, tx_id, "commit") as entry:
        assert c._journal.create(run(entry.tx)).status is status


def test_stats_percentiles_are_nearest_rank_on_every_database(database_url: str):
    with TransactionCoordinator(database_url) as c:
        for seconds in range(1, 101):
            _finished(c, "a", seconds, TxStatus.COMMITTED)
        for seconds in range(1000, 1010):
            _finished(c, "b", seconds, TxStatus.ROLLED_BACK)
        running = c.begin_transaction(name=None)  # open, unnamed: counted, no duration
        c.register_participant(running, "a", print, print)
        journal_started(c, running)
        c.begin_transaction(name="a")  # PENDING: in this process's memory, not journaled
        stats = c.transaction_stats()
    assert stats.by_status[TxStatus.COMMITTED] == 100
    assert stats.by_status[TxStatus.ROLLED_BACK] == 10
    assert stats.by_status[TxStatus.RUNNING] == 1
    assert stats.by_status[TxStatus.PENDING] == 0
    assert stats.by_name[None] == {TxStatus.RUNNING: 1}
    overall = stats.durations
    assert (overall.count, overall.median, overall.p95, overall.p99, overall.max) == (
        110,
        55,
        1004,
        1008,
        1009,
    )
    a = stats.durations_by_name["a"]
    assert (a.count, a.median, a.p95, a.p99, a.max) == (100, 50, 95, 99, 100)
    b = stats.durations_by_name["b"]
    assert (b.count, b.median, b.max) == (10, 1004, 1009)
    assert None not in stats.durations_by_name
    assert stats.oldest_open is not None
    assert stats.oldest_open.name is None


def test_stats_of_an_empty_journal(database_url: str):
    with TransactionCoordinator(database_url) as c:
        stats = c.transaction_stats()
    assert set(stats.by_status.values()) == {0}
    assert stats.durations.count == 0
    assert stats.durations.median is None
    assert stats.oldest_open is None
    assert stats.as_json()["durations"]["p99"] is None


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.list_transactions(limit=0),
        lambda c: c.list_transactions(limit=1001),
        lambda c: c.list_transactions(limit=True),
        lambda c: c.list_transactions(offset=-1),
        lambda c: c.list_transactions(status="DONE"),
        lambda c: c.list_transactions(status=["PENDING", 3]),
        lambda c: c.list_transactions(name=5),
        lambda c: c.list_transactions(older_than=-1),
        lambda c: c.list_transactions(newer_than=float("nan")),
        lambda c: c.list_transactions(older_than=1e12),
        lambda c: c.transaction_stats(finished_within="1d"),
        lambda c: c.purge_transactions(-5),
        lambda c: c.purge_transactions(timedelta(days=-1)),
        lambda c: c.abort_transaction(uuid.uuid4(), reason=3),
    ],
)
def test_bad_arguments_are_refused_and_nothing_changes(tmp_path, call):
    with TransactionCoordinator(f"sqlite:///{tmp_path / 'j.sqlite3'}") as c:
        kept = c.begin_transaction(name="kept")
        c.commit_transaction(journaled := c.begin_transaction(name="journaled"))
        with pytest.raises(InvalidArgument):
            call(c)
        assert c.get_transaction(kept).status is TxStatus.PENDING
        assert [t.id for t in c.list_transactions()] == [journaled]  # PENDING is not journaled


def test_list_accepts_statuses_as_enums_or_text(tmp_path):
    with TransactionCoordinator(f"sqlite:///{tmp_path / 'j.sqlite3'}") as c:
        c.rollback_transaction(rolled_back := c.begin_transaction())
        c.commit_transaction(committed := c.begin_transaction())
        assert [t.id for t in c.list_transactions(status=TxStatus.ROLLED_BACK)] == [rolled_back]
        assert [t.id for t in c.list_transactions(status="committed")] == [committed]
        both = c.list_transactions(status=("rolled_back", TxStatus.COMMITTED))
        assert {t.id for t in both} == {rolled_back, committed}


def _running(c: TransactionCoordinator, tx_id: uuid.UUID) -> None:
    """Left RUNNING at its first step, as by a process that died."""
    journal_started(c, tx_id)


def test_what_another_process_cannot_run_is_refused_before_anything_changes(tmp_path):
    url = f"sqlite:///{tmp_path / 'j.sqlite3'}"
    with TransactionCoordinator(url) as owner, TransactionCoordinator(url) as operator:
        tx_id = owner.begin_transaction()
        owner.register_participant(
            tx_id, "a", lambda: None, lambda: None
        )  # only the owner has them
        _running(owner, tx_id)
        before = operator.get_transaction(tx_id)
        with pytest.raises(ParticipantNotResolvable):
            operator.abort_transaction(tx_id)
        with pytest.raises(ParticipantNotResolvable):
            operator.retry_transaction(tx_id, force=True)
        assert operator.get_transaction(tx_id) == before


def test_celery_transactions_need_the_app_except_to_abort_a_pending_one(tmp_path):
    from celery import Celery

    from tests.apps import tasks

    url = f"sqlite:///{tmp_path / 'j.sqlite3'}"
    app = Celery("ops", broker="memory://")
    with TransactionCoordinator(url, app=app) as client, TransactionCoordinator(url) as no_app:
        running = client.begin_transaction()
        client.register_participant(running, "a", tasks.step.s(str(tmp_path / "e"), "a"))
        _running(client, running)
        before = no_app.get_transaction(running)
        with pytest.raises(ParticipantNotResolvable):
            no_app.abort_transaction(running)
        with pytest.raises(ParticipantNotResolvable):
            no_app.retry_transaction(running, force=True)
        assert no_app.get_transaction(running) == before

        pending = client.begin_transaction()
        client.register_participant(pending, "a", tasks.step.s(str(tmp_path / "e"), "a"))
        # PENDING in this process's memory: any of its coordinators aborts it, nothing to send
        assert no_app.abort_transaction(pending).status is TxStatus.ROLLED_BACK
        assert client.journal.get(pending).status is TxStatus.ROLLED_BACK


def test_transaction_finished_is_sent_once_by_the_process_whose_write_ended_it(tmp_path):
    """An operator's abort and a sweep end Celery transactions too: the signal comes
    from them (once each); in-process transactions send none."""
    from celery import Celery

    from celery_tx import transaction_finished
    from tests.apps import tasks

    received: list[tuple[str | None, TxStatus]] = []

    def on_finished(sender, outcome, **kwargs):  # type: ignore[no-untyped-def]
        received.append((sender, outcome.status))

    transaction_finished.connect(on_finished)
    url = f"sqlite:///{tmp_path / 'j.sqlite3'}"
    app = Celery("signals", broker="memory://")
    try:
        with TransactionCoordinator(url, app=app) as c:
            aborted = c.begin_transaction(name="aborted")
            c.register_participant(aborted, "a", tasks.step.s(str(tmp_path / "e"), "a"))
            c.abort_transaction(aborted)
            c.abort_transaction(aborted)  # already rolled back: no second signal
            late = c.begin_transaction(name="late", timeout=0.001)
            c.register_participant(late, "a", tasks.step.s(str(tmp_path / "e"), "a"))
            time.sleep(0.01)
            assert c.reap().rolled_back == [late]
            local = c.begin_transaction(name="local")
            c.register_participant(local, "a", print, print)
            c.commit_transaction(local)
    finally:
        transaction_finished.disconnect(on_finished)
    assert received == [("aborted", TxStatus.ROLLED_BACK), ("late", TxStatus.ROLLED_BACK)]
