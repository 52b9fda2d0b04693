"""Owners and leases, in-process: a dead owner's transactions are taken over at
once, a live owner's never, whatever the clocks say.

The crash tests SIGKILL a real process running a transaction at a chosen point
(``_CHILD``) and time how long another process's ``recover()`` takes to bring
it to a final status.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from celery_tx import (
    InvalidArgument,
    Outcome,
    StepStatus,
    SweepReport,
    TransactionCoordinator,
    TransactionStateError,
    TxStatus,
    leases,
)
from celery_tx.store import owners
from tests.participants import BLOCK_AT, BLOCKED, append_line_slowly, effect, nothing

ROOT = Path(__file__).resolve().parent.parent

# The child runs a 4-step transaction whose participants append their effect to
# a log (tests.participants.effect), and blocks at ``point``, to be killed:
# "before:N": step N journaled RUNNING, its action not called yet;
# "inside:N": step N's action applied its effect, not returned;
# "after:N": step N's action returned, its end not journaled yet;
# "compensation:N": step 3 failed; step N's compensation applied, not returned.
_CHILD = """
import functools, sys
from celery_tx import TransactionCoordinator
from celery_tx.core.status import StepStatus
from celery_tx.store.journal import Journal
from tests.participants import block, effect, failing_effect
url, log, blocked, point, ready = sys.argv[1:6]
lease, interval = float(sys.argv[6]), float(sys.argv[7])
kind, _, at = point.partition(":")
n = int(at)

def moves(before, after, old, new):
    return before.steps[n].status is old and after.steps[n].status is new

if kind == "before":
    create, save = Journal.create, Journal.save
    def created(self, tx, **kw):
        written = create(self, tx, **kw)
        if n == 0:
            block(blocked)
        return written
    def saved(self, before, after, **kw):
        written = save(self, before, after, **kw)
        if moves(before, after, StepStatus.PENDING, StepStatus.RUNNING):
            block(blocked)
        return written
    Journal.create, Journal.save = created, saved
elif kind == "after":
    save = Journal.save
    def saved(self, before, after, **kw):
        if moves(before, after, StepStatus.RUNNING, StepStatus.DONE):
            block(blocked)
        return save(self, before, after, **kw)
    Journal.save = saved

with TransactionCoordinator(url, lease=lease, heartbeat_interval=interval) as coordinator:
    tx_id = coordinator.begin_transaction(name="crash")
    for i in range(4):
        act = failing_effect if kind == "compensation" and i == 3 else effect
        coordinator.register_participant(
            tx_id,
            f"s{i}",
            functools.partial(act, log, f"s{i} action"),
            functools.partial(effect, log, f"s{i} compensation"),
        )
    with open(ready, "w") as f:
        f.write(str(tx_id))
    coordinator.commit_transaction(tx_id)
"""

POINTS = [
    *(f"{where}:{step}" for step in range(4) for where in ("before", "inside", "after")),
    *(f"compensation:{step}" for step in range(4)),
]


def _killed_at(database_url: str, tmp_path: Path, point: str, lease: float = 15.0) -> uuid.UUID:
    """Run the child until it blocks at ``point``, SIGKILL it; the transaction's id."""
    log, blocked, ready = tmp_path / "effects.log", tmp_path / "blocked", tmp_path / "ready"
    kind, _, at = point.partition(":")
    env = {**os.environ, "PYTHONPATH": str(ROOT), BLOCKED: str(blocked)}
    if kind in ("inside", "compensation"):
        env[BLOCK_AT] = f"s{at} {'action' if kind == 'inside' else 'compensation'}"
    arguments = (database_url, log, blocked, point, ready, lease, lease / 3)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *map(str, arguments)], cwd=ROOT, env=env
    )
    try:
        deadline = time.monotonic() + 60
        while not blocked.exists():
            assert child.poll() is None, f"the child ended ({child.returncode}) before {point}"
            assert time.monotonic() < deadline, f"the child never got to {point}"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    return uuid.UUID(ready.read_text())


def _recover_until_final(database_url: str, tx_id: uuid.UUID) -> tuple[float, object]:
    """Call ``recover()`` every 0.1 s in a new coordinator, as a restarted process
    would, until the transaction is final: the seconds it took, and the outcome."""
    start = time.monotonic()
    with TransactionCoordinator(database_url) as recovering:
        while True:
            recovering.recover()
            outcome = recovering.get_transaction(tx_id)
            if outcome.is_final:
                return time.monotonic() - start, outcome
            assert time.monotonic() - start < 60, f"still {outcome.status} after 60 s"
            time.sleep(0.1)


def _effects(tmp_path: Path) -> list[str]:
    log = tmp_path / "effects.log"
    return log.read_text().splitlines() if log.exists() else []


def _check_effects(point: str, outcome, effects: list[str]) -> None:
    """Every effect accounted for: committed with each action applied, only the
    step killed inside (or after) applied twice; or rolled back with every
    started step compensated."""
    kind, _, at = point.partition(":")
    counts = Counter(effects)
    if kind == "compensation":
        assert outcome.status is TxStatus.ROLLED_BACK
        assert [s.status for s in outcome.steps] == [StepStatus.COMPENSATED] * 4
        assert {f"s{i} compensation" for i in range(4)} <= set(counts)
        assert all(n == 1 for line, n in counts.items() if line != f"s{at} compensation")
        return
    assert outcome.status is TxStatus.COMMITTED
    assert [counts[f"s{i} action"] >= 1 for i in range(4)] == [True] * 4
    twice = {line for line, n in counts.items() if n > 1}
    assert twice <= ({f"s{at} action"} if kind in ("inside", "after") else set())
    assert not any("compensation" in line for line in effects)


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_a_killed_owners_transaction_is_taken_over_at_once_on_its_host(
    database_url: str, tmp_path: Path, point: str
) -> None:
    """The owner's pid is gone: a process on the same host takes over at once,
    long before the lease (15 s) would lapse."""
    tx_id = _killed_at(database_url, tmp_path, point)
    took, outcome = _recover_until_final(database_url, tx_id)
    print(f"same host, killed {point}: {outcome.status} {took:.2f} s after the kill")
    assert took < 5, f"{took:.1f} s from the kill to {outcome.status}"
    _check_effects(point, outcome, _effects(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["inside:1", "compensation:2"])
def test_a_killed_owners_transaction_is_taken_over_when_its_lease_lapses(
    database_url: str, tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another host (its pid means nothing here), the lease decides: the
    takeover comes once it lapses, not before, and not minutes later."""
    lease = 2.0
    tx_id = _killed_at(database_url, tmp_path, point, lease=lease)
    monkeypatch.setattr(leases, "this_host", lambda: "another-host")
    took, outcome = _recover_until_final(database_url, tx_id)
    print(f"another host, lease {lease:g} s, killed {point}: {outcome.status} {took:.2f} s")
    # The last heartbeat came at most one interval (lease / 3) before the kill.
    assert lease * 2 / 3 - 0.2 < took < lease + 5, f"{took:.1f} s"
    _check_effects(point, outcome, _effects(tmp_path))


def test_a_live_owner_keeps_its_transaction_however_long_its_step(
    database_url: str, tmp_path: Path
) -> None:
    """A step three times longer than ``stalled_after``: another process's sweeps,
    every 0.1 s, never take it, and it commits once."""
    log = tmp_path / "effects.log"
    with (
        TransactionCoordinator(database_url, heartbeat_interval=0.2, lease=1) as owner,
        TransactionCoordinator(database_url) as other,
    ):
        tx_id = owner.begin_transaction()
        owner.register_participant(
            tx_id, "slow", functools.partial(append_line_slowly, str(log), "slow", 1.5), nothing
        )
        owner.register_participant(
            tx_id, "next", functools.partial(effect, str(log), "next"), nothing
        )
        handle = owner.commit_transaction_async(tx_id)
        reports = SweepReport()
        while not other.get_transaction(tx_id).is_final:
            reports.add(other.recover(stalled_after=0.5)).add(other.reap())
            time.sleep(0.1)
        outcome = handle.wait(timeout=30)
    assert reports == SweepReport()
    assert outcome.status is TxStatus.COMMITTED
    assert [s.attempts for s in outcome.steps] == [1, 1]
    assert log.read_text().splitlines() == ["slow", "next"]


def _swept_while_it_runs(
    owner: TransactionCoordinator, sweeper: TransactionCoordinator, log: Path, **begin: object
) -> tuple[SweepReport, Outcome]:
    """``owner`` commits a one-step transaction whose step takes a second, while
    ``sweeper`` reaps and recovers every 0.1 s: what the sweeps did, and the end."""
    tx_id = owner.begin_transaction(**begin)  # type: ignore[arg-type]
    owner.register_participant(
        tx_id, "slow", functools.partial(append_line_slowly, str(log), "slow", 1.0), nothing
    )
    handle = owner.commit_transaction_async(tx_id)
    reports = SweepReport()
    while not sweeper.get_transaction(tx_id).is_final:
        reports.add(sweeper.reap()).add(sweeper.recover(stalled_after=300))
        time.sleep(0.1)
    return reports, handle.wait(timeout=30)


def test_a_host_whose_clock_is_an_hour_off_neither_reaps_nor_resumes(
    database_url: str, tmp_path: Path
) -> None:
    """Deadlines, stalls and leases are compared with the database's clock: a
    sweeper whose clock is an hour ahead sees a live transaction as it is."""
    hour_ahead = lambda: datetime.now(UTC) + timedelta(hours=1)  # noqa: E731
    with (
        TransactionCoordinator(database_url) as owner,
        TransactionCoordinator(database_url, clock=hour_ahead) as skewed,
    ):
        reports, outcome = _swept_while_it_runs(owner, skewed, tmp_path / "e.log", timeout=600)
    assert reports == SweepReport()
    assert outcome.status is TxStatus.COMMITTED
    assert outcome.steps[0].attempts == 1


def test_an_owner_whose_clock_is_an_hour_behind_is_not_taken_for_stalled(
    database_url: str, tmp_path: Path
) -> None:
    """Its writes are stamped with the database's time, not its own: a sweeper
    with a correct clock sees its transaction as recent, and leaves it alone."""
    hour_behind = lambda: datetime.now(UTC) - timedelta(hours=1)  # noqa: E731
    with (
        TransactionCoordinator(database_url, clock=hour_behind) as owner,
        TransactionCoordinator(database_url) as other,
    ):
        reports, outcome = _swept_while_it_runs(owner, other, tmp_path / "e.log")
    assert reports == SweepReport()
    assert outcome.status is TxStatus.COMMITTED
    assert outcome.steps[0].attempts == 1


def test_an_owner_that_looked_dead_stops_at_its_next_write(database_url: str, tmp_path: Path):
    """Its lease lapsed while it lived (a long pause): another process took the
    transaction over; the first one's next write is refused, and only the one
    that took over goes on."""
    log = tmp_path / "effects.log"
    with (
        TransactionCoordinator(database_url) as paused,
        TransactionCoordinator(database_url) as other,
    ):
        tx_id = paused.begin_transaction()
        paused.register_participant(
            tx_id, "slow", functools.partial(append_line_slowly, str(log), "slow", 1.0), nothing
        )
        paused.register_participant(
            tx_id, "next", functools.partial(effect, str(log), "next"), nothing
        )
        handle = paused.commit_transaction_async(tx_id)
        while not log.exists():
            time.sleep(0.01)
        owner = leases.current_owner(paused.journal)
        assert owner is not None
        owners.expire(paused.journal, [owner.id])
        assert other.recover().resumed == [tx_id]
        with pytest.raises(TransactionStateError, match="taken over"):
            handle.wait(timeout=30)
        outcome = other.get_transaction(tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert outcome.steps[0].attempts == 2
    assert sorted(log.read_text().splitlines()) == ["next", "slow", "slow"]


def test_the_heartbeat_writes_once_per_interval_however_many_transactions_run(
    database_url: str, tmp_path: Path
) -> None:
    """Each beat is one write transaction on the heartbeat's own thread: the
    lease, and one statement marking every transaction it runs alive, never a
    statement per transaction or per step."""
    beats: list[str] = []

    def heard(conn, cursor, statement, *args):
        if threading.current_thread().name == leases.HEARTBEAT_THREAD:
            beats.append(statement.split("SET")[0].strip())

    with TransactionCoordinator(database_url, heartbeat_interval=0.1, lease=1) as owner:
        sa.event.listen(owner.journal.engines[0], "before_cursor_execute", heard)
        slow = functools.partial(append_line_slowly, str(tmp_path / "l"), "slow", 1.0)
        handles = []
        for _ in range(5):
            tx_id = owner.begin_transaction()
            owner.register_participant(tx_id, "slow", slow, nothing)
            handles.append(owner.commit_transaction_async(tx_id))
        for handle in handles:
            assert handle.wait(timeout=30).status is TxStatus.COMMITTED
    renewals = beats.count("UPDATE celery_tx_owners")
    marks = beats.count("UPDATE celery_tx_transactions")
    assert renewals > 0
    assert 0 < marks <= renewals  # five transactions ran at once: one statement a beat
    # Journaled as an owner once, by the heartbeat, not by the first commit.
    assert sum(b.startswith("INSERT INTO celery_tx_owners") for b in beats) == 1
    assert not any("celery_tx_steps" in b for b in beats if b.startswith(("UPDATE", "INSERT")))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lease": 0},
        {"lease": -1},
        {"heartbeat_interval": "5"},
        {"lease": 5, "heartbeat_interval": 5},
    ],
)
def test_bad_lease_settings_are_refused(database_url: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        TransactionCoordinator(database_url, **kwargs)  # type: ignore[arg-type]


def test_list_show_and_the_web_page_say_who_owns_a_transaction_and_whether_it_lives(
    database_url: str,
) -> None:
    """`celery tx list` and `show` (text and JSON) and the web page's JSON name each
    running transaction's owner and its lease: alive, or lapsed (taken over at
    the next sweep)."""
    import json

    from click.testing import CliRunner
    from flask import Flask

    from celery_tx import transactions_blueprint
    from celery_tx.cli import tx
    from tests.journaled import journal_started, other_owner

    with TransactionCoordinator(database_url) as coordinator:
        alive, dead = (other_owner(coordinator.journal, alive=a) for a in (True, False))
        ids = {}
        for owner in (alive, dead):
            ids[owner] = tx_id = coordinator.begin_transaction()
            coordinator.register_participant(tx_id, "a", nothing, nothing)
            journal_started(coordinator, tx_id, owner=owner)

        def cli(*args: str) -> str:
            result = CliRunner().invoke(tx, [*args, "--database-url", database_url])
            assert result.exit_code == 0, result.output
            return result.stdout

        listing = cli("list")
        assert f"{alive} (lease alive)" in listing
        assert f"{dead} (lease lapsed)" in listing
        assert f"owner:    {dead} (lease lapsed)" in cli("show", str(ids[dead]))
        shown = json.loads(cli("show", str(ids[alive]), "--json"))
        assert (shown["owner"], shown["owner_lease"]) == (alive, "alive")
        listed = json.loads(cli("list", "--json"))["transactions"]
        assert {t["owner"]: t["owner_lease"] for t in listed} == {alive: "alive", dead: "lapsed"}

        app = Flask(__name__)
        app.register_blueprint(transactions_blueprint(coordinator), url_prefix="/tx")
        client = app.test_client()
        page = client.get(f"/tx/api/transactions/{ids[dead]}").get_json()
        assert (page["owner"], page["owner_lease"]) == (dead, "lapsed")
        assert "lease lapsed" in client.get(f"/tx/{ids[dead]}").get_data(as_text=True)
        coordinator.recover()  # the dead one's is taken over: final, no owner shown
        assert cli("show", str(ids[dead])).count("owner:    -") == 1


def _journaled_for(coordinator: TransactionCoordinator, owner: str, log: Path) -> uuid.UUID:
    """An in-process transaction journaled RUNNING by ``owner``, nothing run."""
    from tests.journaled import journal_started

    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", functools.partial(effect, str(log), "a"), nothing)
    journal_started(coordinator, tx_id, owner=owner)
    return tx_id


def test_a_dead_owner_orphans_only_what_it_was_running_at_its_last_heartbeat(
    database_url: str, tmp_path: Path
) -> None:
    """A transaction its owner no longer ran at its last heartbeat (a Celery step
    handed over, its next message queued) is not taken over when the owner
    dies: the stall rule decides, as for any queued step."""
    from tests.journaled import other_owner

    with TransactionCoordinator(database_url) as coordinator:
        journal = coordinator.journal
        owner = other_owner(journal, alive=True)
        queued = _journaled_for(coordinator, owner, tmp_path / "q")
        running = _journaled_for(coordinator, owner, tmp_path / "r")
        time.sleep(0.01)  # the heartbeat comes after both writes
        beat = functools.partial(owners.renew, journal, owner, host="h", pid=1, lease=3600)
        beat(running=[running])  # its last heartbeat: only one still runs there
        owners.expire(journal, [owner])  # then it dies
        assert coordinator.recover(stalled_after=60).resumed == [running]
        assert coordinator.get_transaction(queued).status is TxStatus.RUNNING
        assert coordinator.recover(stalled_after=0).resumed == [queued]  # once stalled


def test_after_the_journal_was_unreachable_a_lapsed_lease_waits_a_lease(
    database_url: str, tmp_path: Path
) -> None:
    """The owners' heartbeats could not land either: their leases lapsed while they
    lived. This process takes nothing over by lease until they had a lease's
    time to renew; a pid gone from this host still counts at once."""
    from tests.journaled import other_owner

    with TransactionCoordinator(database_url, lease=1, heartbeat_interval=0.2) as coordinator:
        tx_id = _journaled_for(
            coordinator, other_owner(coordinator.journal, alive=False), tmp_path / "e"
        )
        coordinator.journal.last_trouble = time.monotonic()  # an outage just ended
        assert coordinator.recover(stalled_after=60) == SweepReport()
        time.sleep(1.3)
        assert coordinator.recover(stalled_after=60).resumed == [tx_id]


def test_a_sweep_acts_only_on_the_version_its_claim_judged(database_url: str, tmp_path: Path):
    """A worker or owner wrote between the claim and the sweep's read: left alone,
    for the next sweep to judge again."""
    from celery_tx.sweeps import SweepReport as Report
    from tests.journaled import other_owner

    with TransactionCoordinator(database_url) as coordinator:
        tx_id = _journaled_for(
            coordinator, other_owner(coordinator.journal, alive=False), tmp_path / "e"
        )
        tx = coordinator.get_transaction(tx_id)
        report = Report()
        sweeper = coordinator._sweeper
        sweeper._guarded(tx_id, report, sweeper.resume, version=tx.version - 1)
        assert report == Report()
        assert coordinator.get_transaction(tx_id) == tx


def test_closing_one_of_an_apps_coordinators_keeps_the_process_lease(tmp_path: Path) -> None:
    """An app's journal, and its owner, are shared by its coordinators and its
    tasks: closing one leaves the others' transactions owned by a live owner."""
    from celery import Celery

    app = Celery("leased", broker="memory://")
    app.conf.celery_tx_database_url = f"sqlite:///{tmp_path / 'j.sqlite3'}"
    with TransactionCoordinator(app=app) as first:
        tx_id = first.begin_transaction()
        first.register_participant(tx_id, "a", nothing, nothing)
        first.commit_transaction(tx_id)
        owner = leases.current_owner(first.journal)
        assert owner is not None
        TransactionCoordinator(app=app).close()
        assert leases.current_owner(first.journal) is owner
        assert first.owner_leases([first.get_transaction(tx_id)]) == {}  # final: none shown
        assert owners.leases(first.journal, [owner.id])[owner.id].alive


def test_an_owner_registered_twice_is_registered_once(database_url: str) -> None:
    """A registration whose acknowledgement was lost is retried: no conflict."""
    with TransactionCoordinator(database_url) as coordinator:
        journal = coordinator.journal
        for _ in range(2):
            owners.register(journal, "h:1:x", host="h", pid=1, lease=15)
        assert owners.leases(journal, ["h:1:x"])["h:1:x"].alive


def test_this_host_tells_machines_and_pid_namespaces_apart() -> None:
    host = leases.this_host()
    assert host.startswith(__import__("socket").gethostname())
    if Path("/proc/sys/kernel/random/boot_id").exists():
        assert Path("/proc/sys/kernel/random/boot_id").read_text().strip() in host
        assert "pidns:" in host
