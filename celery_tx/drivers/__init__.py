"""The drivers: each runs one kind of participant behind ``celery_tx.driver.Driver``.

- ``local``: plain callables, called in this process;
- ``celery_tasks``: ``@participant`` Celery tasks, sent to workers.
"""
