"""A minimal app on the project's celeryconfig, for tests that run real workers."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

app = Celery("embedded")
app.config_from_object("celeryconfig")


@app.task(name="embedded.touch")
def touch(path: str, text: str) -> str:
    """Append ``text`` to the file at ``path``: a side effect the test can see."""
    with Path(path).open("a") as f:
        f.write(text + "\n")
    return text
