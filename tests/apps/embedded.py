"""A minimal app on the project's celeryconfig, for tests that run real workers."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from celery_tx import TransactionCoordinator

app = Celery("embedded", include=["tests.apps.tasks"])
app.config_from_object("celeryconfig")
coordinator = TransactionCoordinator(app=app)  # all a worker needs, too


@app.task(name="embedded.touch")
def touch(path: str, text: str) -> str:
    """Append ``text`` to the file at ``path``: a side effect the test can see."""
    with Path(path).open("a") as f:
        f.write(text + "\n")
    return text
