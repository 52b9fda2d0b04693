"""An owner's lease, as the journal holds it: who runs a transaction, and whether it lives."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Lease:
    """An owner's row, as the operators' commands show it."""

    owner: str
    """The owner's id (``Outcome.owner``): host, pid and a random part."""
    host: str
    """Its host, as owners tell hosts apart (name, boot, pid namespace)."""
    pid: int
    """Its process id on that host."""
    lease_until: datetime
    """Until when (the database's time) its last heartbeat keeps it alive."""
    alive: bool
    """The lease holds by the database's clock, and the owner did not stop."""
    released: bool
    """It stopped cleanly, with nothing running."""
