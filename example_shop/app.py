"""The shop's Celery app and coordinator: ``celery -A example_shop.app worker``.

Configuration comes from the project's ``celeryconfig.py`` (the embedded default,
or the broker and journal the environment names). Each service's tasks go to
its own queue, as separate services would have; a worker serves the queues
given with ``-Q`` (``ALL_QUEUES`` for all four).
"""

from __future__ import annotations

from celery import Celery

from celery_tx import TransactionCoordinator
from example_shop.settings import SERVICES, queue

SERVICE_MODULES = [f"example_shop.services.{service}" for service in SERVICES]
ALL_QUEUES = ",".join(queue(service) for service in SERVICES)
"""The four services' queues (``SHOP_QUEUE_PREFIX`` read when this is imported)."""


def configure(app: Celery) -> Celery:
    """Give ``app`` the shop's configuration and service tasks."""
    app.config_from_object("celeryconfig")
    app.conf.task_routes = {f"shop.{s}.*": {"queue": queue(s)} for s in SERVICES}
    app.conf.include = SERVICE_MODULES
    return app


app = configure(Celery("example_shop"))
coordinator = TransactionCoordinator(app=app)
