"""The SQL journal: tables, engines and compare-and-set writes (SQLAlchemy 2)."""

from celery_tx.store.journal import Journal

__all__ = ["Journal"]
