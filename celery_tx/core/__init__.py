"""The pure core: statuses, snapshots, transitions and errors.

Nothing here does I/O, reads a clock, or imports Celery or SQLAlchemy; every
function takes the current snapshot (and ``now`` where a time is recorded) and
returns a new one, so the rules can be tested exhaustively without a database.
"""
