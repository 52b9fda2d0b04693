"""Bad input to the Celery-mode API: each is refused with its typed error, and nothing runs.

Every refusal is checked three ways: the exact error type and message; the
journal (no step added, the transaction still PENDING, or what the case says);
and the effects, lines appended by the participants to a file, which stay
empty. The registration refusals need no worker: they run once, on the
embedded stack, where the filesystem broker's queue folder shows that no
message was even sent; one test replays them all in front of a real worker.
The cases that need a worker (commit without an app, commit twice, a commit
that times out, a journal row naming a foreign task) run on every stack.
"""

from __future__ import annotations

import functools
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any

import celery
import pytest
import sqlalchemy as sa
from celery import chord, group
from celery.contrib.testing.worker import start_worker

from celery_tx import (
    BrokerUnavailable,
    InvalidArgument,
    InvalidParticipant,
    InvalidTransactionId,
    Outcome,
    ParticipantNotResolvable,
    StepStatus,
    TransactionCoordinator,
    TransactionNotFound,
    TransactionStateError,
    TxStatus,
    participant,
)
from celery_tx.core.errors import DuplicateParticipant
from celery_tx.drivers.celery_tasks import messages, registry
from celery_tx.store import schema
from tests.apps import tasks
from tests.apps.tasks import effects
from tests.journaled import start_without_running
from tests.participants import append_line
from tests.stacks import Stack

WAIT = 60  # seconds a transaction may take, at most, on a loaded machine
PLAIN_TASK = "tests.bad_input.plain"  # an ordinary @app.task, not a participant

# Registration refusals need neither a worker nor a broker: once, on the embedded stack.
EMBEDDED = pytest.mark.parametrize("stack", ["embedded"], indirect=True)


@pytest.fixture
def coordinator(celery_app: Any) -> Iterator[TransactionCoordinator]:
    """A coordinator on the test app: a worker thread journals to the same database."""
    with TransactionCoordinator(app=celery_app) as coordinator:
        yield coordinator


@pytest.fixture
def path(tmp_path: Path) -> str:
    """The effects file the participants append to."""
    return str(tmp_path / "effects")


@contextmanager
def _refused(error: type[Exception], match: str) -> Iterator[pytest.ExceptionInfo[Any]]:
    """``pytest.raises`` that also insists on the exact type, not a subclass."""
    with pytest.raises(error, match=match) as info:
        yield info
    assert info.type is error, f"expected exactly {error.__name__}, got {info.type.__name__}"


def _touch(path: str, text: str) -> None:
    """The body of the plain (non-participant) task: an effect the test could see."""
    append_line(path, f"plain:{text}")


def _plain_task(app: Any) -> Any:
    return app.task(name=PLAIN_TASK)(_touch)


def _deeply_nested(depth: int = 100_000) -> list[Any]:
    """A list in a list in a list..., deeper than JSON (or repr) can recurse."""
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    return nested


def _sent(stack: Stack) -> list[str]:
    """Messages waiting in the embedded (filesystem) broker's queue."""
    assert stack.name == "embedded"
    return sorted(p.name for p in (stack.data_dir / "broker" / "queue").iterdir())


def _assert_untouched(
    coordinator: TransactionCoordinator, tx_id: uuid.UUID, stack: Stack, path: str
) -> None:
    """Nothing journaled, nothing sent to the broker, nothing run."""
    tx = coordinator.get_transaction(tx_id)
    assert tx.status is TxStatus.PENDING
    assert tx.steps == ()
    assert _sent(stack) == []
    assert effects(path) == []


def _drain(coordinator: TransactionCoordinator) -> None:
    """Commit a sentinel transaction: once it is done, the worker took every earlier message."""
    tx_id = coordinator.begin_transaction(name="sentinel")
    coordinator.register_participant(tx_id, "sentinel", tasks.noop.s())
    assert coordinator.commit_transaction(tx_id, timeout=WAIT).status is TxStatus.COMMITTED


def _wait_final(coordinator: TransactionCoordinator, tx_id: uuid.UUID) -> Outcome:
    """Poll the journal until the transaction is final (there is no handle to wait on)."""
    deadline = time.monotonic() + WAIT
    while True:
        tx = coordinator.get_transaction(tx_id)
        if tx.is_final:
            return tx
        if time.monotonic() > deadline:
            pytest.fail(f"transaction {tx_id} still {tx.status} after {WAIT}s")
        time.sleep(0.05)


# -- registrations refused -------------------------------------------------------

Build = Callable[[str, Any], tuple[Any, Any]]
"""(effects path, Celery app) -> (commit_function, rollback_function)."""

_NOT_ONE_SIGNATURE = "must be the signature of one participant task"
_OPTIONS = "signature options {} are not supported in a transaction"

BAD_REGISTRATIONS: dict[str, tuple[Build, type[Exception], str]] = {
    # 1. Ordinary Celery tasks, or any task name, are not participants.
    "plain-task": (
        lambda p, app: (_plain_task(app).s(p, "a"), None),
        InvalidParticipant,
        f"commit_function '{PLAIN_TASK}' is not a celery-tx action task; "
        "declare it with @participant",
    ),
    "task-by-name": (
        lambda p, app: (app.signature("os.system", args=("true",)), None),
        InvalidParticipant,
        "commit_function 'os.system' is not a celery-tx action task",
    ),
    "plain-task-as-rollback": (
        lambda p, app: (tasks.step.s(p, "a"), _plain_task(app).s(p, "undo")),
        InvalidParticipant,
        f"rollback_function '{PLAIN_TASK}' is not a celery-tx compensation task",
    ),
    # 2. An action with no declared compensation needs a rollback signature.
    "no-compensation": (
        lambda p, app: (tasks.no_undo.s(p), None),
        InvalidParticipant,
        "commit_function: participant 'tests.no_undo' has no compensation",
    ),
    # 3. Roles: an action is not a compensation, and the other way round.
    "action-as-rollback": (
        lambda p, app: (tasks.step.s(p, "a"), tasks.step.s(p, "a")),
        InvalidParticipant,
        "rollback_function 'tests.step' is not a celery-tx compensation task",
    ),
    "compensation-as-action": (
        lambda p, app: (tasks.undo_step.s(p, "a"), None),
        InvalidParticipant,
        "commit_function 'tests.apps.tasks.undo_step' is not a celery-tx action task",
    ),
    # 4. One participant is two signatures or two callables, never one of each.
    "signature-with-callable-rollback": (
        lambda p, app: (tasks.step.s(p, "a"), functools.partial(append_line, p, "undo")),
        InvalidParticipant,
        f"rollback_function {_NOT_ONE_SIGNATURE}",
    ),
    "signature-with-lambda-rollback": (
        lambda p, app: (tasks.step.s(p, "a"), lambda: None),
        InvalidParticipant,
        f"rollback_function {_NOT_ONE_SIGNATURE}",
    ),
    "callable-with-signature-rollback": (
        lambda p, app: (functools.partial(append_line, p, "a"), tasks.undo_step.s(p, "a")),
        InvalidParticipant,
        "commit_function is a plain callable but rollback_function a Celery signature",
    ),
    # 6. Arguments the JSON serializer cannot send.
    "object-argument": (
        lambda p, app: (tasks.step.s(p, object()), None),
        InvalidArgument,
        "commit_function: arguments cannot be sent as JSON, the participant serializer: "
        "Object of type object is not JSON serializable",
    ),
    "set-argument": (
        lambda p, app: (tasks.step.s(p, "a", behaviour={"ok"}), None),
        InvalidArgument,
        "commit_function: arguments cannot be sent as JSON.*Object of type set",
    ),
    "set-in-rollback": (
        lambda p, app: (tasks.step.s(p, "a"), tasks.undo_step.s(p, {"a"})),
        InvalidArgument,
        "rollback_function: arguments cannot be sent as JSON.*Object of type set",
    ),
    "int-keys-would-turn-into-strings": (
        lambda p, app: (tasks.step.s(p, "a", behaviour={1: 2}), None),
        InvalidArgument,
        "commit_function: arguments would not reach the participant unchanged through JSON",
    ),
    "nan-would-not-come-back-equal": (
        lambda p, app: (tasks.step.s(p, float("nan")), None),
        InvalidArgument,
        "commit_function: arguments would not reach the participant unchanged through JSON",
    ),
    "nested-too-deeply": (
        lambda p, app: (tasks.step.s(p, _deeply_nested()), None),
        InvalidArgument,
        "commit_function: arguments are nested too deeply to send as JSON",
    ),
    # 7. Arguments that do not fit the function.
    "missing-argument": (
        lambda p, app: (tasks.step.s(p), None),
        InvalidArgument,
        "commit_function: arguments do not fit tests.step: missing a required argument: 'name'",
    ),
    "unknown-keyword": (
        lambda p, app: (tasks.step.s(p, "a", colour="red"), None),
        InvalidArgument,
        "commit_function: arguments do not fit tests.step: "
        "got an unexpected keyword argument 'colour'",
    ),
    "too-many-arguments": (
        lambda p, app: (tasks.step.s(p, "a", "ok", "extra"), None),
        InvalidArgument,
        "commit_function: arguments do not fit tests.step: too many positional arguments",
    ),
    "rollback-missing-argument": (
        lambda p, app: (tasks.step.s(p, "a"), tasks.undo_step.s()),
        InvalidArgument,
        "rollback_function: arguments do not fit tests.apps.tasks.undo_step: "
        "missing a required argument: 'path'",
    ),
    # 8. The kwargs celery-tx puts in every message are not the user's.
    **{
        f"reserved-{key}": (
            lambda p, app, key=key: (tasks.step.s(p, "a", **{key: str(uuid.uuid4())}), None),
            InvalidArgument,
            re.escape(f"commit_function: keyword arguments ['{key}'] are reserved by celery-tx"),
        )
        for key in (
            "celery_tx_id",
            "celery_tx_step",
            "celery_tx_phase",
            "celery_tx_carried",
            "celery_tx_version",
        )
    },
    "reserved-in-rollback": (
        lambda p, app: (tasks.step.s(p, "a"), tasks.undo_step.s(p, "a", celery_tx_phase="action")),
        InvalidArgument,
        re.escape("rollback_function: keyword arguments ['celery_tx_phase'] are reserved"),
    ),
    # 9. Canvas is not a participant; options that change how the chain runs are refused.
    "chain": (
        lambda p, app: (tasks.step.s(p, "a") | tasks.step.s(p, "b"), None),
        InvalidParticipant,
        f"commit_function {_NOT_ONE_SIGNATURE}",
    ),
    "group": (
        lambda p, app: (group(tasks.step.s(p, "a"), tasks.step.s(p, "b")), None),
        InvalidParticipant,
        f"commit_function {_NOT_ONE_SIGNATURE}",
    ),
    "chord": (
        lambda p, app: (chord([tasks.step.s(p, "a")], tasks.noop.si()), None),
        InvalidParticipant,
        f"commit_function {_NOT_ONE_SIGNATURE}",
    ),
    "chain-as-rollback": (
        lambda p, app: (
            tasks.step.s(p, "a"),
            tasks.undo_step.s(p, "a") | tasks.undo_step.s(p, "b"),
        ),
        InvalidParticipant,
        f"rollback_function {_NOT_ONE_SIGNATURE}",
    ),
    "link": (
        lambda p, app: (tasks.step.s(p, "a").set(link=tasks.noop.si()), None),
        InvalidArgument,
        re.escape(f"commit_function: {_OPTIONS.format(['link'])}"),
    ),
    "on-error": (
        lambda p, app: (tasks.step.s(p, "a").on_error(tasks.noop.si()), None),
        InvalidArgument,
        re.escape(f"commit_function: {_OPTIONS.format(['link_error'])}"),
    ),
    "countdown": (
        lambda p, app: (tasks.step.s(p, "a").set(countdown=5), None),
        InvalidArgument,
        re.escape(_OPTIONS.format(["countdown"])),
    ),
    "pickle-serializer": (
        lambda p, app: (tasks.step.s(p, "a").set(serializer="pickle"), None),
        InvalidArgument,
        re.escape(_OPTIONS.format(["serializer"])),
    ),
    "link-on-rollback": (
        lambda p, app: (tasks.step.s(p, "a"), tasks.undo_step.s(p, "a").set(link=tasks.noop.si())),
        InvalidArgument,
        re.escape(f"rollback_function: {_OPTIONS.format(['link'])}"),
    ),
    "unencodable-option": (
        lambda p, app: (tasks.step.s(p, "a").set(priority=object()), None),
        InvalidArgument,
        "commit_function: signature option priority=<object object at .*> is not a valid priority",
    ),
    "mistyped-option": (
        lambda p, app: (tasks.step.s(p, "a").set(queue=["a", "b"]), None),
        InvalidArgument,
        re.escape("commit_function: signature option queue=['a', 'b'] is not a valid queue"),
    ),
    "negative-time-limit": (
        lambda p, app: (tasks.step.s(p, "a").set(time_limit=-1), None),
        InvalidArgument,
        "commit_function: signature option time_limit=-1 is not a valid time_limit",
    ),
}


@EMBEDDED
@pytest.mark.parametrize("case", BAD_REGISTRATIONS)
def test_a_bad_registration_is_refused_before_anything_is_journaled(
    case: str, coordinator: TransactionCoordinator, celery_app: Any, stack: Stack, path: str
) -> None:
    """Each bad commit/rollback pair raises its exact error; no step, no message, no effect."""
    build, error, match = BAD_REGISTRATIONS[case]
    tx_id = coordinator.begin_transaction()
    commit_function, rollback_function = build(path, celery_app)
    with _refused(error, match):
        coordinator.register_participant(tx_id, "bad", commit_function, rollback_function)
    _assert_untouched(coordinator, tx_id, stack, path)


def test_refused_registrations_leave_nothing_a_worker_runs(
    coordinator: TransactionCoordinator, celery_app: Any, celery_worker: Any, path: str
) -> None:
    """Every refused registration above, then one good step, committed by a real worker:
    only the good step is journaled and only its action ran."""
    tx_id = coordinator.begin_transaction()
    for case, (build, error, match) in BAD_REGISTRATIONS.items():
        commit_function, rollback_function = build(path, celery_app)
        with _refused(error, match):
            coordinator.register_participant(tx_id, case, commit_function, rollback_function)
    coordinator.register_participant(tx_id, "good", tasks.step.s(path, "good"))
    outcome = coordinator.commit_transaction(tx_id, timeout=WAIT)
    assert outcome.status is TxStatus.COMMITTED
    assert [s.name for s in outcome.steps] == ["good"]
    assert effects(path) == ["good:action"]


@EMBEDDED
def test_what_kombus_json_carries_exactly_is_accepted(
    coordinator: TransactionCoordinator, stack: Stack, path: str
) -> None:
    """Tuples arrive as lists (as with any Celery task); datetime, date, time,
    Decimal, UUID and bytes come back equal through kombu's JSON: all accepted."""
    values = [
        (1, "two"),
        datetime(2026, 12, 8, 1, 2, 3, tzinfo=UTC),
        date(2026, 12, 8),
        dtime(1, 2),
        Decimal("10.50"),
        uuid.UUID(int=42),
        b"\x00bytes",
        {"nested": [1.5, None, True]},
    ]
    tx_id = coordinator.begin_transaction()
    for i, value in enumerate(values):
        coordinator.register_participant(tx_id, f"s{i}", tasks.step.s(path, "a", behaviour=value))
    assert len(coordinator.get_transaction(tx_id).steps) == len(values)


@EMBEDDED
def test_an_explicit_rollback_signature_makes_an_undeclared_undo_acceptable(
    coordinator: TransactionCoordinator, stack: Stack, path: str
) -> None:
    """The advice in the no-compensation error works: with rollback_function it registers."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.no_undo.s(path), tasks.noop_undo.s())
    (step,) = coordinator.get_transaction(tx_id).steps
    assert (step.action["task"], step.compensation["task"]) == ("tests.no_undo", "tests.noop_undo")
    assert _sent(stack) == []


@EMBEDDED
def test_routing_options_are_accepted_and_journaled(
    coordinator: TransactionCoordinator, stack: Stack, path: str
) -> None:
    """queue (an allowed option) registers, on the action and on its paired compensation."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a").set(queue="elsewhere"))
    (step,) = coordinator.get_transaction(tx_id).steps
    assert step.action["options"] == {"queue": "elsewhere"}
    assert step.compensation["options"] == {"queue": "elsewhere"}
    assert step.status is StepStatus.PENDING
    assert _sent(stack) == []


@EMBEDDED
@pytest.mark.parametrize(
    ("service_name", "match"),
    [
        ("", "service_name must be a non-empty string"),
        ("   ", "service_name must be a non-empty string"),
        (5, "service_name must be a non-empty string"),
        ("x" * 201, "at most 200 characters"),
        ("a\x00b", "without NUL"),
    ],
)
def test_a_bad_service_name_is_refused(
    coordinator: TransactionCoordinator, stack: Stack, path: str, service_name: Any, match: str
) -> None:
    """The step name must be short, non-empty text the database can store."""
    tx_id = coordinator.begin_transaction()
    with _refused(InvalidArgument, match):
        coordinator.register_participant(tx_id, service_name, tasks.step.s(path, "a"))
    _assert_untouched(coordinator, tx_id, stack, path)


@EMBEDDED
def test_a_bad_rollback_retry_is_refused(
    coordinator: TransactionCoordinator, stack: Stack, path: str
) -> None:
    """rollback_retry must be a RetryPolicy, not a number of attempts."""
    tx_id = coordinator.begin_transaction()
    with _refused(InvalidArgument, "rollback_retry must be a RetryPolicy, got 3"):
        coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"), rollback_retry=3)
    _assert_untouched(coordinator, tx_id, stack, path)


@EMBEDDED
def test_a_duplicate_service_name_keeps_the_first_step(
    coordinator: TransactionCoordinator, stack: Stack, path: str
) -> None:
    """A second participant with the same name is refused; the first stays as registered."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "first"))
    with _refused(DuplicateParticipant, "already has a participant named 'a'"):
        coordinator.register_participant(tx_id, "a", tasks.step.s(path, "second"))
    (step,) = coordinator.get_transaction(tx_id).steps
    assert '"first"' in step.action["arguments"]
    assert _sent(stack) == []
    assert effects(path) == []


# -- 5. one transaction, one kind of participant --------------------------------


@EMBEDDED
@pytest.mark.parametrize("first", ["callables", "signature"])
def test_callables_and_signatures_do_not_mix_in_one_transaction(
    coordinator: TransactionCoordinator, stack: Stack, path: str, first: str
) -> None:
    """Whichever kind came first, the other is refused: the first step stays, alone."""
    callables = (
        functools.partial(append_line, path, "callable:action"),
        functools.partial(append_line, path, "callable:undo"),
    )
    signature = (tasks.step.s(path, "signature"), None)
    kinds = {"callables": callables, "signature": signature}
    second = "signature" if first == "callables" else "callables"
    holds = "plain callables" if first == "callables" else "Celery tasks"
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "first", *kinds[first])
    with _refused(
        InvalidParticipant,
        f"holds {holds}; one transaction cannot mix callables and Celery signatures",
    ):
        coordinator.register_participant(tx_id, "second", *kinds[second])
    tx = coordinator.get_transaction(tx_id)
    assert tx.status is TxStatus.PENDING
    assert [(s.name, s.status) for s in tx.steps] == [("first", StepStatus.PENDING)]
    assert _sent(stack) == []
    assert effects(path) == []


# -- 10. transaction ids ---------------------------------------------------------


@EMBEDDED
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "", 12345, None, b"0" * 16])
def test_a_malformed_transaction_id_is_refused(
    coordinator: TransactionCoordinator, stack: Stack, path: str, bad_id: Any
) -> None:
    """Registering, committing or reading with a non-UUID id raises InvalidTransactionId."""
    match = re.escape(f"not a transaction id (a UUID or its string form): {bad_id!r}")
    with _refused(InvalidTransactionId, match):
        coordinator.register_participant(bad_id, "a", tasks.step.s(path, "a"))
    with _refused(InvalidTransactionId, match):
        coordinator.commit_transaction(bad_id, timeout=WAIT)
    with _refused(InvalidTransactionId, match):
        coordinator.commit_transaction_async(bad_id)
    with _refused(InvalidTransactionId, match):
        coordinator.get_transaction(bad_id)
    assert _sent(stack) == []
    assert effects(path) == []


@EMBEDDED
def test_an_unknown_transaction_id_is_refused(
    coordinator: TransactionCoordinator, stack: Stack, path: str
) -> None:
    """A well-formed id the journal does not hold raises TransactionNotFound, creates nothing."""
    unknown = uuid.uuid4()
    match = f"no transaction {unknown} in the journal; a PENDING transaction lives only in"
    with _refused(TransactionNotFound, match):
        coordinator.register_participant(unknown, "a", tasks.step.s(path, "a"))
    with _refused(TransactionNotFound, match):
        coordinator.register_participant(str(unknown), "a", tasks.step.s(path, "a"))
    with _refused(TransactionNotFound, match):
        coordinator.commit_transaction(unknown, timeout=WAIT)
    with _refused(TransactionNotFound, match):
        coordinator.commit_transaction_async(unknown)
    with _refused(TransactionNotFound, match):
        coordinator.get_transaction(unknown)  # still nothing journaled under that id
    assert _sent(stack) == []
    assert effects(path) == []


# -- 13. commit timeouts ------------------------------------------------------------


@EMBEDDED
@pytest.mark.parametrize(
    ("timeout", "match"),
    [
        (-1, "timeout must be zero or more seconds, got -1"),
        (-0.001, "timeout must be zero or more seconds"),
        (math.nan, "timeout must be zero or more seconds, got nan"),
        ("5", "timeout must be a number of seconds, got '5'"),
        (True, "timeout must be a number of seconds, got True"),
        ([1], "timeout must be a number of seconds"),
    ],
)
def test_a_bad_commit_timeout_is_refused_before_anything_is_sent(
    coordinator: TransactionCoordinator, stack: Stack, path: str, timeout: Any, match: str
) -> None:
    """InvalidArgument; the transaction and its step stay PENDING and nothing is sent."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"))
    with _refused(InvalidArgument, match):
        coordinator.commit_transaction(tx_id, timeout=timeout)
    tx = coordinator.get_transaction(tx_id)
    assert tx.status is TxStatus.PENDING
    assert [s.status for s in tx.steps] == [StepStatus.PENDING]
    assert _sent(stack) == []
    assert effects(path) == []


@EMBEDDED
@pytest.mark.parametrize(
    ("timeout", "match"),
    [
        (-1, "timeout must be a positive, finite number of seconds"),
        (0, "timeout must be a positive, finite number of seconds"),
        (math.inf, "timeout must be a positive, finite number of seconds"),
        ("60", "timeout must be a number of seconds"),
    ],
)
def test_a_bad_transaction_deadline_is_refused(
    coordinator: TransactionCoordinator, stack: Stack, timeout: Any, match: str
) -> None:
    """begin_transaction(timeout=...) must be a positive, finite number of seconds."""
    with _refused(InvalidArgument, match):
        coordinator.begin_transaction(timeout=timeout)


@EMBEDDED
@pytest.mark.parametrize("timeout", [-1, "5"])
def test_a_bad_wait_timeout_is_refused(
    coordinator: TransactionCoordinator, stack: Stack, path: str, timeout: Any
) -> None:
    """CommitHandle.wait(timeout) refuses what commit_transaction(timeout) refuses."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"))
    handle = coordinator.commit_transaction_async(tx_id)  # no worker: it stays RUNNING
    with _refused(InvalidArgument, "timeout must be"):
        handle.wait(timeout)


# -- 11. committing Celery tasks without the app -------------------------------------


def test_committing_celery_tasks_without_an_app_is_refused(
    coordinator: TransactionCoordinator, celery_app: Any, celery_worker: Any, path: str
) -> None:
    """A coordinator built without app= raises ParticipantNotResolvable, journals nothing,
    sends nothing; the transaction stays PENDING and a coordinator with the app commits it."""
    with TransactionCoordinator(celery_app.conf.celery_tx_database_url) as no_app:
        tx_id = no_app.begin_transaction()
        no_app.register_participant(tx_id, "a", tasks.step.s(path, "a"))
        match = re.escape(
            f"transaction {tx_id} has Celery task participants: "
            "commit it with TransactionCoordinator(app=...)"
        )
        with _refused(ParticipantNotResolvable, match):
            no_app.commit_transaction(tx_id)
        with _refused(ParticipantNotResolvable, match):
            no_app.commit_transaction(tx_id, timeout=WAIT)
        with _refused(ParticipantNotResolvable, match):
            no_app.commit_transaction_async(tx_id)
    _drain(coordinator)  # the worker has had its chance
    tx = coordinator.get_transaction(tx_id)
    assert tx.status is TxStatus.PENDING
    assert [s.status for s in tx.steps] == [StepStatus.PENDING]
    assert effects(path) == []
    outcome = coordinator.commit_transaction(tx_id, timeout=WAIT)
    assert outcome.status is TxStatus.COMMITTED
    assert effects(path) == ["a:action"]


# -- 12. a transaction commits once ------------------------------------------------------


def test_commit_twice_and_register_after_commit_are_refused(
    coordinator: TransactionCoordinator, celery_worker: Any, path: str
) -> None:
    """After COMMITTED: commit, commit_async, register and rollback raise
    TransactionStateError; the journal is unchanged and no action ran twice."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"))
    coordinator.register_participant(tx_id, "b", tasks.step.s(path, "b"))
    outcome = coordinator.commit_transaction(tx_id, timeout=WAIT)
    assert outcome.status is TxStatus.COMMITTED
    ended = re.escape(f"transaction {tx_id}: it is COMMITTED (it already ended)")
    with _refused(TransactionStateError, f"cannot commit {ended}"):
        coordinator.commit_transaction(tx_id, timeout=WAIT)
    with _refused(TransactionStateError, f"cannot commit {ended}"):
        coordinator.commit_transaction_async(tx_id)
    with _refused(TransactionStateError, f"cannot register a participant in {ended}"):
        coordinator.register_participant(tx_id, "c", tasks.step.s(path, "c"))
    with _refused(TransactionStateError, f"cannot roll back {ended}"):
        coordinator.rollback_transaction(tx_id)
    _drain(coordinator)
    assert coordinator.get_transaction(tx_id) == outcome
    assert effects(path) == ["a:action", "b:action"]


# -- 15. a commit that times out goes on --------------------------------------------------


def test_a_commit_timeout_leaves_the_transaction_running_and_it_goes_on(
    coordinator: TransactionCoordinator, celery_app: Any, path: str
) -> None:
    """No worker: commit_transaction(timeout=0.2) raises TimeoutError with the transaction
    RUNNING; a second commit, a registration or a rollback are refused meanwhile; a worker
    started later finishes it COMMITTED, each action run once."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"))
    coordinator.register_participant(tx_id, "b", tasks.step.s(path, "b"))
    with _refused(TimeoutError, re.escape(f"transaction {tx_id} was not final after 0.2s")):
        coordinator.commit_transaction(tx_id, timeout=0.2)
    tx = coordinator.get_transaction(tx_id)
    assert tx.status is TxStatus.RUNNING
    assert [s.status for s in tx.steps] == [StepStatus.PENDING] * 2  # no worker started one
    assert effects(path) == []
    started = re.escape(f"transaction {tx_id}: it is RUNNING (its commit already started)")
    with _refused(TransactionStateError, f"cannot commit {started}"):
        coordinator.commit_transaction(tx_id, timeout=WAIT)
    with _refused(TransactionStateError, f"cannot register a participant in {started}"):
        coordinator.register_participant(tx_id, "c", tasks.step.s(path, "c"))
    with _refused(TransactionStateError, f"cannot roll back {started}"):
        coordinator.rollback_transaction(tx_id)
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        outcome = _wait_final(coordinator, tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert [(s.name, s.attempts) for s in outcome.steps] == [("a", 1), ("b", 1)]
    assert effects(path) == ["a:action", "b:action"]


# -- 14. the broker is down at commit -------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_broker_down_at_commit_rolls_back_with_nothing_run(tmp_path: Path) -> None:
    """BrokerUnavailable, quickly; the transaction is ROLLED_BACK, every step SKIPPED, the
    error names the broker; it cannot be committed again."""
    path = str(tmp_path / "effects")
    app = celery.Celery("down", set_as_current=False)
    app.conf.update(
        broker_url="redis://127.0.0.1:1/0",  # nothing listens there
        broker_connection_timeout=1,
        broker_connection_max_retries=1,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.1,
            "interval_max": 0.1,
        },
        result_backend=None,
        celery_tx_database_url=f"sqlite:///{tmp_path / 'journal.sqlite3'}",
        task_default_queue=f"celery_tx_test_{uuid.uuid4().hex[:12]}",
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
    )
    try:
        with TransactionCoordinator(app=app) as coordinator:
            tx_id = coordinator.begin_transaction()
            coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"))
            coordinator.register_participant(tx_id, "b", tasks.step.s(path, "b"))
            # Within the commit's timeout (a TimeoutError otherwise): publishing
            # gives up by the app's retry policy, not forever.
            with _refused(
                BrokerUnavailable,
                rf"could not send transaction {tx_id} to the broker \(.*\); it is ROLLED_BACK",
            ):
                coordinator.commit_transaction(tx_id, timeout=WAIT)
            tx = coordinator.get_transaction(tx_id)
            assert tx.status is TxStatus.ROLLED_BACK
            assert [s.status for s in tx.steps] == [StepStatus.SKIPPED] * 2
            assert tx.failed_step is None
            assert "the broker refused the transaction's first task" in (tx.error or "")
            with _refused(TransactionStateError, "it is ROLLED_BACK"):
                coordinator.commit_transaction(tx_id)
    finally:
        app.close()
    assert effects(path) == []


# -- 16. a journal row naming a task that is not a participant ------------------------------


def _tamper(url: str, tx_id: uuid.UUID, step: str, column: str, **changes: Any) -> None:
    """Rewrite keys of a step's journaled action or compensation, as a tamperer could."""
    table = schema.steps
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            where = (table.c.tx_id == tx_id) & (table.c.name == step)
            description = conn.execute(sa.select(table.c[column]).where(where)).scalar_one()
            conn.execute(sa.update(table).where(where).values({column: {**description, **changes}}))
    finally:
        engine.dispose()


def test_a_journaled_compensation_that_is_not_declared_is_refused_not_run(
    coordinator: TransactionCoordinator, celery_app: Any, celery_worker: Any, tmp_path: Path
) -> None:
    """Step a's compensation is rewritten to os.system in the journal once the commit
    journaled it, then c fails: a's compensation is refused (COMPENSATION_FAILED,
    "refused"), never sent; b and c are still compensated; the transaction ends FAILED
    naming a."""
    path = str(tmp_path / "effects")
    canary = tmp_path / "canary"
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"))
    coordinator.register_participant(tx_id, "b", tasks.step.s(path, "b"))
    coordinator.register_participant(tx_id, "c", tasks.step.s(path, "c", "fail"))
    started = start_without_running(coordinator, tx_id)
    # Harmless, and visible if it ever ran (a worker does not even know the name).
    payload = f'[["touch {canary}"], {{}}]'
    _tamper(
        celery_app.conf.celery_tx_database_url,
        *(tx_id, "a", "compensation"),
        task="os.system",
        arguments=payload,
    )
    outcome = coordinator._drivers.of(started).commit(started, WAIT)  # sends what start built
    assert outcome.status is TxStatus.FAILED
    assert outcome.failed_step == "a"
    a, b, c = outcome.steps
    assert a.status is StepStatus.COMPENSATION_FAILED
    assert "refused" in (a.compensation_error or "")
    assert "'os.system' as its compensation, which is not a celery-tx compensation task" in (
        a.compensation_error or ""
    )
    assert (b.status, c.status) == (StepStatus.COMPENSATED, StepStatus.COMPENSATED)
    assert effects(path) == [
        "a:action",
        "b:action",
        "c:action-failed",
        "c:compensation",
        "b:compensation",
    ]
    assert not canary.exists()


@EMBEDDED
def test_a_journaled_action_that_is_not_declared_is_not_sent(
    coordinator: TransactionCoordinator, celery_app: Any, stack: Stack, path: str
) -> None:
    """A journaled step whose action was rewritten to os.system after the commit's write:
    a coordinator resuming it from the journal (its first message was lost) refuses it,
    sends nothing, and ends it FAILED with the reason (nothing had run)."""
    tx_id = coordinator.begin_transaction()
    coordinator.register_participant(tx_id, "a", tasks.step.s(path, "a"))
    start_without_running(coordinator, tx_id)  # journaled; its message never sent
    _tamper(celery_app.conf.celery_tx_database_url, tx_id, "a", "action", task="os.system")
    with TransactionCoordinator(app=celery_app) as other:  # reads the row, not a cache
        report = other.recover(stalled_after=0)
        tx = other.get_transaction(tx_id)
    ((failed_id, error),) = report.failed
    assert failed_id == tx_id
    assert "names 'os.system' as its action, which is not a celery-tx action task" in error
    assert tx.status is TxStatus.ROLLED_BACK  # its step had not started: nothing to undo
    assert "not a celery-tx action task" in (tx.error or "")
    assert _sent(stack) == []
    assert effects(path) == []


# -- 17. declaring participants ----------------------------------------------------------


def _unique(prefix: str) -> str:
    return f"tests.bad_input.{prefix}.{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bind": True}, "participants cannot be bind=True; use current_step"),
        ({"retry_for": ValueError}, "retry_for must be a tuple of exception types"),
        ({"retry_for": [ValueError]}, "retry_for must be a tuple of exception types"),
        ({"retry_for": (ValueError, "x")}, "retry_for must be a tuple of exception types"),
        ({"retry": 3}, "retry must be a RetryPolicy, got 3"),
        ({"name": ""}, "name must be a non-empty string, got ''"),
        ({"name": "  "}, "name must be a non-empty string"),
        ({"name": 5}, "name must be a non-empty string, got 5"),
    ],
    ids=[
        "bind",
        "retry_for-type",
        "retry_for-list",
        "retry_for-member",
        "retry",
        "name-empty",
        "name-blank",
        "name-int",
    ],
)
def test_participant_options_are_checked(options: dict[str, Any], match: str) -> None:
    """@participant(...) with a bad option raises InvalidArgument and declares nothing;
    the same options on @x.compensation(...) too."""
    name = _unique("bad")

    def action() -> None:
        """Never declared."""

    with _refused(InvalidArgument, match):
        participant(**{"name": name, **options})(action)
    assert registry.lookup(name, "action") is None
    if "name" not in options:
        assert registry.lookup(name, "compensation") is None
        with _refused(InvalidArgument, match):
            tasks.noop.compensation(**{"name": name, **options})(action)
        assert registry.lookup(name, "compensation") is None


def test_participant_decorates_only_callables() -> None:
    """@participant applied to something that is not a function raises InvalidParticipant."""
    with _refused(InvalidParticipant, "@participant decorates a function, got 'charge'"):
        participant("charge")


def test_a_compensation_has_no_compensation() -> None:
    """@undo.compensation on a compensation task raises InvalidParticipant, bare or with
    options."""
    name = _unique("undo_of_undo")

    def undo_of_undo() -> None:
        """Never declared."""

    match = "'tests.apps.tasks.undo_step' is a compensation; it has no compensation"
    with _refused(InvalidParticipant, match):
        tasks.undo_step.compensation(undo_of_undo)
    with _refused(InvalidParticipant, match):
        tasks.undo_step.compensation(name=name)(undo_of_undo)
    assert registry.lookup(name, "compensation") is None


def test_a_task_name_belongs_to_one_function() -> None:
    """Declaring a name another function holds raises InvalidParticipant; the first keeps it,
    in either role."""
    name = _unique("owned")

    def first() -> None:
        """The owner."""

    def second() -> None:
        """The intruder."""

    def fresh() -> None:
        """An action without a compensation yet."""

    participant(name=name)(first)
    action = participant(name=_unique("fresh"))(fresh)
    for declare in (participant(name=name), action.compensation(name=name)):
        with _refused(InvalidParticipant, f"task name '{name}' is already a participant"):
            declare(second)
        assert registry.lookup(name, "action").function is first  # type: ignore[union-attr]
    with _refused(InvalidParticipant, "task name 'tests.step' is already a participant"):
        participant(name="tests.step")(second)
    assert registry.lookup("tests.step", "action").function is tasks.step.run  # type: ignore[union-attr]


@EMBEDDED
def test_a_refused_second_compensation_is_not_left_declared(
    coordinator: TransactionCoordinator, celery_app: Any, stack: Stack
) -> None:
    """A second @x.compensation for the same action raises InvalidParticipant; the first
    stays paired, and the refused one cannot be used as a rollback."""
    action_name, first_undo, second_undo = _unique("act"), _unique("undo1"), _unique("undo2")

    def act() -> None:
        """The action."""

    def undo() -> None:
        """Its compensation."""

    def other_undo() -> None:
        """A second compensation."""

    task = participant(name=action_name)(act)
    task.compensation(name=first_undo)(undo)
    with _refused(InvalidParticipant, f"already has the compensation '{first_undo}'"):
        task.compensation(name=second_undo)(other_undo)
    assert registry.lookup(action_name, "action").compensation == first_undo  # type: ignore[union-attr]
    tx_id = coordinator.begin_transaction()
    with _refused(InvalidParticipant, f"'{second_undo}' is not a celery-tx compensation task"):
        coordinator.register_participant(tx_id, "a", task.s(), celery_app.signature(second_undo))


@EMBEDDED
def test_a_participant_task_instead_of_its_signature_is_refused(
    coordinator: TransactionCoordinator, stack: Stack
) -> None:
    """tasks.noop, tasks.noop_undo (the tasks, not .s()) must not become in-process callables."""
    tx_id = coordinator.begin_transaction()
    with _refused(InvalidParticipant, "signature"):
        coordinator.register_participant(tx_id, "n", tasks.noop, tasks.noop_undo)


def test_an_errback_the_journal_does_not_back_changes_nothing(
    coordinator: TransactionCoordinator, celery_app: Any, path: str
) -> None:
    """A refused, forged or stale message fires the errback it carries (Celery calls
    errbacks on Reject too): while the transaction runs, that errback must not abort it."""
    from types import SimpleNamespace

    from celery_tx.drivers.celery_tasks.dispatch import STEP_FAILED
    from celery_tx.drivers.celery_tasks.messages import task_id

    step_failed = celery_app.tasks[STEP_FAILED]  # as the worker calls it: on its app

    tx_id = coordinator.begin_transaction()
    for name in ("a", "b"):
        coordinator.register_participant(tx_id, name, tasks.step.s(path, name))
    coordinator.commit_transaction_async(tx_id)  # no worker yet: RUNNING, nothing started
    forged = [
        ("nonexistent", "x"),  # a step the transaction does not have
        ("a", "forged-id"),  # a real step, but not its message
        ("b", task_id(tx_id, 1, "action")),  # the right message for a step not yet failing
    ]
    for step, message_id in forged:
        request = SimpleNamespace(id=message_id, kwargs={"celery_tx_step": step})
        step_failed(request, RuntimeError("forged"), None, str(tx_id))
        assert coordinator.get_transaction(tx_id).status is TxStatus.RUNNING
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        outcome = _wait_final(coordinator, tx_id)
    assert outcome.status is TxStatus.COMMITTED
    assert effects(path) == ["a:action", "b:action"]


@pytest.mark.parametrize("version", ["3", 2.5, True, [3]])
def test_a_message_with_a_malformed_journal_version_is_refused(version: object) -> None:
    """The first action's message names the journal version its chain was sent
    from: anything but an integer there is refused with a typed error, before
    any journal write."""
    kwargs = {
        "celery_tx_id": str(uuid.uuid4()),
        "celery_tx_step": "a",
        "celery_tx_phase": "action",
        "celery_tx_version": version,
    }
    with pytest.raises(InvalidArgument, match="journal version"):
        messages.pop_step_message(kwargs)
