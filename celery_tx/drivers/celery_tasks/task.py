"""``@participant``: a Celery task whose base class journals its step around the function."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, overload

import celery
from celery import shared_task

from celery_tx.core.errors import InvalidArgument, InvalidParticipant
from celery_tx.core.retry import RetryPolicy
from celery_tx.drivers.celery_tasks import hooks, messages, registry, worker


class ParticipantTask(celery.Task):  # type: ignore[misc]  # Celery ships no type hints
    """Base class of participant tasks: safe delivery defaults and step journaling.

    Sent by celery-tx (its kwargs name a transaction), the task journals its
    step, runs the function and journals the result; called any other way it
    is a plain task.
    """

    # A step is acknowledged only after it ran and is redelivered when its
    # worker dies: a crash never loses a step (the journal says if it ran).
    acks_late = True
    reject_on_worker_lost = True
    # JSON only, whatever the app's default: a message must never run pickled code.
    serializer = "json"
    # The kwargs carry the transaction id, which the user's function does not
    # take; registration checks the user's arguments against it instead.
    typing = False
    # The journal keeps every step's result; the result backend need not.
    ignore_result = True

    celery_tx_role: registry.Role = "action"
    celery_tx_retry_for: tuple[type[BaseException], ...] = ()
    """Exceptions that mean "try again later" (an action) rather than a failure."""
    celery_tx_retry: RetryPolicy | None = None
    """How an action's transient errors, or a compensation's errors, are retried."""

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Celery's hook when the task is bound to an app: the app's workers sweep,
        and log which transaction each line is about (``hooks.install``)."""
        hooks.install(app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        message = messages.pop_step_message(kwargs)
        if message is None:
            return super().__call__(*args, **kwargs)
        carried = None
        if message.carried:  # the chain put the previous step's hand-over first
            if not args:
                raise InvalidArgument("the message lacks the previous step's result")
            carried, args = messages.Carried.from_message(args[0]), args[1:]
        return worker.run_step(self, message, carried, args, kwargs)

    def compensation(self, function: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Declare ``function`` as this action's undo: also a participant task.

        It is called with the action's arguments unless the registration gives
        a rollback signature; usable bare (``@charge.compensation``) or with the
        same options as ``@participant``.
        """
        if self.celery_tx_role != "action":
            raise InvalidParticipant(f"{self.name!r} is a compensation; it has no compensation")
        _check_options(options)

        def declare(undo: Callable[..., Any]) -> Any:
            name = _task_name(undo, options.get("name"))
            registry.check_pair(self.name, name)  # before the task exists anywhere
            task = _participant_task(undo, role="compensation", **{**options, "name": name})
            registry.pair(self.name, name)
            return task

        return declare if function is None else declare(function)


@overload
def participant(function: Callable[..., Any], /) -> Any: ...
@overload
def participant(
    *,
    name: str | None = None,
    queue: str | None = None,
    retry_for: tuple[type[BaseException], ...] = (),
    retry: RetryPolicy | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    **celery_options: Any,
) -> Callable[[Callable[..., Any]], Any]: ...
def participant(function: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Make ``function`` a participant: a Celery task bound shared-task style.

    Usable bare (``@participant``) or with options: ``name`` (default
    ``module.function``), ``queue``, ``retry_for`` (exception types retried by
    ``retry``, a ``RetryPolicy``, without compensating), ``throws`` (Celery's
    own: the business exceptions it raises in normal operation, such as
    ``InsufficientFunds``; they still roll the transaction back, but Celery and
    celery-tx log them at info level without a traceback), ``time_limit`` and
    ``soft_time_limit`` (seconds), and any other Celery task option. The task's
    ``.compensation`` decorator declares its undo. Bad options are refused here,
    with ``InvalidArgument``.
    """
    _check_options(options)
    if function is None:
        return lambda f: _participant_task(f, role="action", **options)
    return _participant_task(function, role="action", **options)


def _check_options(options: dict[str, Any]) -> None:
    if options.get("bind"):
        raise InvalidArgument("participants cannot be bind=True; use current_step() instead")
    for key in ("retry_for", "throws"):
        types = options.get(key, ())
        if not (isinstance(types, tuple) and all(_is_exception(t) for t in types)):
            raise InvalidArgument(f"{key} must be a tuple of exception types, got {types!r}")
    retry = options.get("retry")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidArgument(f"retry must be a RetryPolicy, got {retry!r}")
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise InvalidArgument(f"name must be a non-empty string, got {name!r}")
    queue = options.get("queue")
    if queue is not None and (not isinstance(queue, str) or not queue.strip()):
        raise InvalidArgument(f"queue must be a non-empty string, got {queue!r}")
    for limit in ("time_limit", "soft_time_limit"):
        value = options.get(limit)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf
        ):
            raise InvalidArgument(f"{limit} must be a positive number of seconds, got {value!r}")


def _participant_task(
    function: Callable[..., Any],
    *,
    role: registry.Role,
    name: str | None = None,
    retry_for: tuple[type[BaseException], ...] = (),
    retry: RetryPolicy | None = None,
    **celery_options: Any,
) -> Any:
    if not callable(function):
        raise InvalidParticipant(f"@participant decorates a function, got {function!r}")
    name = _task_name(function, name)
    registry.declare(registry.ParticipantSpec(name, role, function))
    return shared_task(
        base=ParticipantTask,
        name=name,
        celery_tx_role=role,
        celery_tx_retry_for=retry_for,
        celery_tx_retry=retry,
        **{k: v for k, v in celery_options.items() if v is not None},
    )(function)


def _task_name(function: Callable[..., Any], name: object) -> str:
    if name is None:
        return f"{function.__module__}.{function.__qualname__}"
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"name must be a non-empty string, got {name!r}")
    return name


def _is_exception(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)
