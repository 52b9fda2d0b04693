"""A local SMTP server that keeps what arrives: the demo's mail server.

It accepts every address except those at ``bounce.example``, which it refuses
with 550, the way a real server refuses an unknown mailbox.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from typing import Any

from aiosmtpd.controller import Controller

REFUSED_DOMAIN = "bounce.example"


@dataclass
class Received:
    """What the sink has received so far (thread-safe)."""

    deliveries: Counter[str] = field(default_factory=Counter)
    """How many times each Message-ID arrived."""
    order_of: dict[str, str] = field(default_factory=dict)
    """The order id each Message-ID is for."""
    refused: int = 0
    """Recipients refused."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def emails_by_order(self) -> dict[str, set[str]]:
        """The distinct Message-IDs received, by order id."""
        with self.lock:
            result: dict[str, set[str]] = {}
            for message_id, order_id in self.order_of.items():
                result.setdefault(order_id, set()).add(message_id)
            return result

    def duplicates(self) -> int:
        """Deliveries beyond the first of the same Message-ID."""
        with self.lock:
            return sum(count - 1 for count in self.deliveries.values())


class _Handler:
    def __init__(self, received: Received) -> None:
        self.received = received

    async def handle_RCPT(  # noqa: N802  (aiosmtpd's hook name)
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.lower().endswith("@" + REFUSED_DOMAIN):
            with self.received.lock:
                self.received.refused += 1
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = message_from_bytes(envelope.content, policy=policy.default)
        message_id = str(message["Message-ID"]).strip()
        with self.received.lock:
            self.received.deliveries[message_id] += 1
            self.received.order_of[message_id] = str(message["X-Order-Id"]).strip()
        return "250 Message accepted for delivery"


class SmtpSink:
    """``with SmtpSink() as sink:`` serves SMTP on ``sink.port`` until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.received = Received()
        self._controller = Controller(_Handler(self.received), hostname=host, port=self.port)

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._controller.stop()


def _free_port(host: str) -> int:
    # aiosmtpd's controller checks that it serves by connecting to its port, so
    # it needs a real number rather than 0; ask the OS for one that is free.
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
