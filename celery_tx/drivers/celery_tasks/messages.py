"""Journal descriptions of participant signatures, and the messages built from them.

A step's action and compensation are journaled as the task's registered name
and its arguments encoded with kombu's JSON (the task serializer participants
use), so what a worker or a recovery sweep sends later is exactly what was
registered. Each message carries the transaction id, step name and phase in its
kwargs (Flower's search finds a whole transaction by its id) and a task id
derived from them.
"""

from __future__ import annotations

import reprlib
import uuid
from dataclasses import dataclass
from typing import Any

from celery.canvas import Signature
from kombu.utils.json import dumps as _kombu_dumps
from kombu.utils.json import loads as _kombu_loads

from celery_tx.context import Phase
from celery_tx.core.errors import InvalidArgument, InvalidParticipant
from celery_tx.core.outcome import Outcome
from celery_tx.drivers.celery_tasks import registry

DESCRIPTION_KIND = "celery"
"""The ``kind`` of a journaled participant task call."""
TX_ID = "celery_tx_id"
TX_STEP = "celery_tx_step"
TX_PHASE = "celery_tx_phase"
TX_CARRIED = "celery_tx_carried"
"""Set on an action that a chain sends after another: the chain passes it the
previous step's ``Carried`` as its first argument (its signature is mutable)."""
TX_VERSION = "celery_tx_version"
"""On the first action a chain sends: the journal version the chain was sent
from, the compare-and-set of that step's start (``Journal.start_first``)."""
RESERVED_KWARGS = (TX_ID, TX_STEP, TX_PHASE, TX_CARRIED, TX_VERSION)

# Options a registered signature may carry into its message: routing and limits.
# Anything else (links, errbacks, serializer...) would change how the chain runs.
_ALLOWED_OPTIONS = frozenset(
    {"queue", "routing_key", "exchange", "priority", "time_limit", "soft_time_limit"}
)


@dataclass(frozen=True)
class StepMessage:
    """Which transaction, step and phase a participant task was sent for."""

    tx_id: uuid.UUID
    step: str
    phase: Phase
    carried: bool = False
    """Whether the task's first argument is the previous step's ``Carried``."""
    version: int | None = None
    """The journal version the chain was sent from (its first action only)."""


@dataclass(frozen=True)
class Carried:
    """What an action hands the next one through the chain (its return value):
    its position, its result, and the journal version its worker last wrote or
    read. The next step's worker journals both steps from it in one write."""

    previous: int
    result: Any
    version: int

    KEY = "celery_tx_carried"

    def to_message(self) -> dict[str, Any]:
        """The JSON the chain passes on."""
        return {self.KEY: [self.previous, self.version], "result": self.result}

    @classmethod
    def from_message(cls, value: Any) -> Carried:
        """Parse what the chain passed on; ``InvalidArgument`` when it is not ours."""
        try:
            previous, version = value[cls.KEY]
            result = value["result"]
        except (TypeError, KeyError, ValueError):
            raise InvalidArgument(f"expected the previous step's result, got {value!r}") from None
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (previous, version)):
            raise InvalidArgument(f"expected the previous step's result, got {value!r}")
        return cls(previous, result, version)


def describe(signature: object, *, role: registry.Role, what: str) -> dict[str, Any]:
    """The journal form of ``signature``; refuses anything the driver could not run."""
    call, spec = _participant(signature, role, what)
    return encode_call(spec, tuple(call.args), dict(call.kwargs), call.options, what)


def describe_with_paired_compensation(
    signature: object, what: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The journal forms of the action ``signature`` and of its declared
    compensation, called with the same arguments (encoded once)."""
    call, spec = _participant(signature, "action", what)
    compensation = registry.lookup(spec.compensation, "compensation") if spec.compensation else None
    if compensation is None:
        raise InvalidParticipant(
            f"{what}: participant {spec.name!r} has no compensation; declare one "
            "with @<task>.compensation or pass rollback_function"
        )
    args, kwargs = tuple(call.args), dict(call.kwargs)
    action = encode_call(spec, args, kwargs, call.options, what)
    _check_arguments(compensation, args, kwargs, what)
    paired = {**action, "task": compensation.name}
    if "options" in action:
        paired["options"] = dict(action["options"])
    return action, paired


def _participant(
    signature: object, role: registry.Role, what: str
) -> tuple[Signature, registry.ParticipantSpec]:
    """``signature`` and the participant it calls; ``InvalidParticipant`` unless
    it is the signature of one declared ``role`` task."""
    if not isinstance(signature, Signature) or type(signature) is not Signature:
        raise InvalidParticipant(
            f"{what} must be the signature of one participant task (task.s(...)), got {signature!r}"
        )
    spec = registry.lookup(signature.task, role)
    if spec is None:
        raise InvalidParticipant(
            f"{what} {signature.task!r} is not a celery-tx {role} task; declare it with "
            + ("@participant" if role == "action" else "@<action>.compensation")
        )
    return signature, spec


def encode_call(
    spec: registry.ParticipantSpec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    what: str,
) -> dict[str, Any]:
    """Check the call against the function and the serializer, and describe it."""
    clash = [key for key in kwargs if key in RESERVED_KWARGS]
    if clash:
        raise InvalidArgument(f"{what}: keyword arguments {clash} are reserved by celery-tx")
    problem = options_problem(options)
    if problem is not None:
        raise InvalidArgument(f"{what}: {problem}")
    _check_arguments(spec, args, kwargs, what)
    payload = _round_trip(args, kwargs, what)
    description: dict[str, Any] = {
        "kind": DESCRIPTION_KIND,
        "task": spec.name,
        "arguments": payload,
    }
    if options:
        try:
            _dumps(options)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise InvalidArgument(f"{what}: options cannot be sent as JSON: {exc}") from exc
        description["options"] = dict(options)
    return description


def options_problem(options: object) -> str | None:
    """What is wrong with a step's signature options (None: nothing): only routing
    and time limits, each of its type. Checked when a signature is registered and
    again on every journaled description a message is built from: a row must not
    add links, errbacks, a serializer or a countdown."""
    if not isinstance(options, dict):
        return f"signature options must be a mapping, got {type(options).__name__}"
    unknown = sorted(str(key) for key in set(options) - _ALLOWED_OPTIONS)
    if unknown:
        return (
            f"signature options {unknown} are not supported in a transaction "
            f"(allowed: {sorted(_ALLOWED_OPTIONS)})"
        )
    for key, value in options.items():
        if key in ("queue", "routing_key", "exchange"):
            fits = isinstance(value, str) and 0 < len(value) <= 255
        elif key == "priority":
            fits = type(value) is int and 0 <= value <= 255
        else:  # the time limits
            fits = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and 0 < value <= _MAX_TIME_LIMIT
            )
        if not fits:
            return f"signature option {key}={value!r} is not a valid {key}"
    return None


_MAX_TIME_LIMIT = 365 * 86400.0


def _round_trip(args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> str:
    """The arguments in kombu's JSON, the participant serializer; ``InvalidArgument``
    unless the worker would get them back equal (tuples arrive as lists, as with
    any Celery task sent as JSON). kombu's JSON carries ``datetime``, ``date``,
    ``time``, ``Decimal``, ``UUID`` and ``bytes`` exactly; it would turn
    ``{1: 2}`` into ``{"1": 2}`` and NaN into something unequal, silently."""
    sent = [list(args), kwargs]
    try:
        payload = _dumps(sent)
        received = _loads(payload)
        same = received == _tuples_as_lists(sent)
    except RecursionError:
        raise InvalidArgument(f"{what}: arguments are nested too deeply to send as JSON") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(
            f"{what}: arguments cannot be sent as JSON, the participant serializer: {exc}"
        ) from exc
    if not same:
        raise InvalidArgument(
            f"{what}: arguments would not reach the participant unchanged through JSON "
            f"(sent {reprlib.repr(sent)}, received {reprlib.repr(received)}): use string "
            "keys, finite numbers, and str, int, float, bool, None, lists, dicts, datetime, "
            "date, time, Decimal, UUID or bytes"
        )
    return payload


def _tuples_as_lists(value: Any) -> Any:
    """``value`` as JSON gives it back: tuples (at any depth) as lists."""
    if isinstance(value, list | tuple):
        return [_tuples_as_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _tuples_as_lists(item) for key, item in value.items()}
    return value


def _check_arguments(
    spec: registry.ParticipantSpec, args: tuple[Any, ...], kwargs: dict[str, Any], what: str
) -> None:
    """``InvalidArgument`` unless the function takes these arguments."""
    signature = registry.signature_of(spec)
    if signature is None:  # a builtin without a signature: Celery will tell
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidArgument(f"{what}: arguments do not fit {spec.name}: {exc}") from exc


def decode_arguments(description: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The args and kwargs a journaled call was registered with; ``ValueError`` when
    the journal holds something else."""
    args, kwargs = _loads(description["arguments"])
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("arguments are not [args, kwargs]")
    if not all(isinstance(key, str) for key in kwargs):
        raise ValueError("keyword argument names are not strings")
    return tuple(args), dict(kwargs)


def task_id(tx_id: uuid.UUID, position: int, phase: Phase) -> str:
    """The Celery task id of a step's phase: the transaction id, readable in Flower."""
    return f"{tx_id}.{position}.{phase}"


def build_signature(
    app: Any,
    tx: Outcome,
    position: int,
    phase: Phase,
    *,
    carried: bool = False,
    version: int | None = None,
) -> Signature:
    """The signature that runs ``phase`` of step ``position``: immutable, or, when
    ``carried``, taking the previous action's ``Carried`` as its first argument;
    ``version``: the journal version its chain is sent from (a chain's first action).

    Refuses a journaled task name that is not a declared participant of that
    phase in this process: a journal row must not be able to run arbitrary tasks.
    """
    step = tx.steps[position]
    description = step.action if phase == "action" else step.compensation
    role: registry.Role = "action" if phase == "action" else "compensation"
    task = description.get("task") if isinstance(description, dict) else None
    if not isinstance(task, str) or _lookup(app, task, role) is None:
        raise InvalidParticipant(
            f"step {step.name!r} of transaction {tx.id} names {task!r} as its {phase}, "
            f"which is not a celery-tx {role} task in this process; nothing was sent"
        )
    try:
        args, kwargs = decode_arguments(description)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise InvalidParticipant(
            f"step {step.name!r} of transaction {tx.id} journals malformed {phase} "
            f"arguments ({type(exc).__name__}); nothing was sent"
        ) from None
    problem = options_problem(description.get("options", {}))
    if problem is not None:
        raise InvalidParticipant(
            f"step {step.name!r} of transaction {tx.id} journals refused {phase} options: "
            f"{problem}; nothing was sent"
        )
    kwargs.update({TX_ID: str(tx.id), TX_STEP: step.name, TX_PHASE: phase})
    if carried:
        kwargs[TX_CARRIED] = True
    if version is not None:
        kwargs[TX_VERSION] = version
    options = {**description.get("options", {}), "task_id": task_id(tx.id, position, phase)}
    return Signature(
        description["task"], args, kwargs, options=options, immutable=not carried, app=app
    )


def _lookup(app: Any, name: str, role: registry.Role) -> registry.ParticipantSpec | None:
    """The participant, importing the app's task modules first if this process has not.

    A worker imports them when it starts; a client, ``celery tx`` or a web
    process may not have (the app's ``include``/``imports`` and autodiscovered
    modules): without this, an operator's abort there would find no
    compensation and end the transaction FAILED.
    """
    spec = registry.lookup(name, role)
    if spec is None and app is not None:
        import_participants(app)
        spec = registry.lookup(name, role)
    return spec


def import_participants(app: Any) -> None:
    """Import the app's task modules (``include``, ``imports``, autodiscovered), as
    ``celery worker`` does when it starts: so does a process about to send a
    transaction's tasks, before it journals anything."""
    if hasattr(app, "loader"):
        app.loader.import_default_modules()


def pop_step_message(kwargs: dict[str, Any]) -> StepMessage | None:
    """Remove celery-tx's keys from a task's kwargs; None when it was not sent by us."""
    if TX_ID not in kwargs:
        return None
    raw_id, step, phase = kwargs.pop(TX_ID), kwargs.pop(TX_STEP, None), kwargs.pop(TX_PHASE, None)
    carried = kwargs.pop(TX_CARRIED, False) is True
    version = kwargs.pop(TX_VERSION, None)
    try:
        tx_id = uuid.UUID(str(raw_id))
    except ValueError:
        raise InvalidArgument(f"message names transaction {raw_id!r}, not a UUID") from None
    if not isinstance(step, str) or phase not in ("action", "compensation"):
        raise InvalidArgument(f"message names step {step!r} in phase {phase!r}")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise InvalidArgument(f"message names journal version {version!r}, not an integer")
    return StepMessage(tx_id, step, phase, carried=carried and phase == "action", version=version)


def _dumps(value: Any) -> str:
    """kombu's JSON, the encoding Celery's ``json`` serializer sends (dates, UUIDs...)."""
    return str(_kombu_dumps(value))  # type: ignore[no-untyped-call]


def _loads(text: str) -> Any:
    return _kombu_loads(text)  # type: ignore[no-untyped-call]
