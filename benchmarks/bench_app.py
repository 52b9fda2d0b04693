"""The Celery app both sides of ``benchmarks/saga_vs_chain.py`` run on.

Configured by the project's ``celeryconfig.py`` (so by ``CELERY_BROKER_URL``,
``CELERY_RESULT_BACKEND`` and ``CELERY_TX_DATABASE_URL``), with two kinds of
no-op task: a participant (and its compensation) and a plain Celery task.
"""

from __future__ import annotations

from celery import Celery

from celery_tx import TransactionCoordinator, participant

app = Celery("bench")
app.config_from_object("celeryconfig")
coordinator = TransactionCoordinator(app=app)


@participant(name="bench.step")
def step() -> None:
    """A participant that does nothing."""


@step.compensation(name="bench.undo")
def undo() -> None:
    """Its compensation, which does nothing either."""


@app.task(name="bench.noop")
def noop() -> None:
    """A plain Celery task that does nothing, as a plain chain uses."""
