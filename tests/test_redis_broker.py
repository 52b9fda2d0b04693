"""The Redis transport closes a channel cleanly after its connection was collected.

What a Celery worker does when its Redis goes away, done by hand on a private
``redis-server`` (celery_tx/drivers/celery_tasks/redis_broker.py says why):
a consumer channel holds an unacknowledged message with a BRPOP in flight, a
second channel consumes an auto-delete fanout queue (as the worker's remote
control does), the server is killed, then ``Connection.collect()`` and
``Connection.close()`` run, as Celery's consumer runs them. kombu's own transport
raises ``AttributeError`` from the close (the worker's "Unrecoverable error");
celery-tx's raises nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Queue

from tests.private_broker import PrivateRedis

OURS = "celery_tx.drivers.celery_tasks.redis_broker:Transport"
KOMBUS = "redis"


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    """A ``redis-server`` of this test's own, running."""
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


def _lose_the_server_while_consuming(server: PrivateRedis, transport: str) -> Connection:
    """A connection in the state a worker's is in when Redis dies under it; the
    server is dead when this returns and ``collect()`` has run."""
    # BRPOP waits up to 10 s (the polling interval), so one stays in flight.
    connection = Connection(
        server.url, transport=transport, transport_options={"polling_interval": 10}
    )
    tasks = Queue("tasks", Exchange("tasks"), "tasks")
    with Connection(server.url) as producer:
        producer.Producer().publish(
            {"n": 1}, exchange=tasks.exchange, routing_key="tasks", declare=[tasks]
        )
    received: list[Any] = []
    channel = connection.default_channel
    channel.basic_qos(0, 4, False)  # room for more: the consumer keeps a BRPOP in flight
    Consumer(channel, [tasks], callbacks=[lambda body, message: received.append(message)]).consume()
    control = Queue("control", Exchange("control", type="fanout"), auto_delete=True)
    Consumer(connection.channel(), [control], callbacks=[lambda body, message: None]).consume()
    # Until the message came (an event of the control channel may come first) and
    # the next BRPOP was sent and waits for its reply.
    deadline = time.monotonic() + 30
    while not (received and channel._in_poll):
        assert time.monotonic() < deadline, f"received {len(received)}, in poll {channel._in_poll}"
        with contextlib.suppress(TimeoutError):  # socket.timeout: nothing came
            connection.drain_events(timeout=0.1)
    assert len(received) == 1, "not acknowledged: restored when the channel closes"
    server.stop()
    connection.collect(socket_timeout=5)
    return connection


def test_closing_after_collect_raises_nothing_with_our_transport(redis_server: PrivateRedis):
    connection = _lose_the_server_while_consuming(redis_server, OURS)
    connection.close()  # kombu's own transport raises AttributeError here


def test_kombus_own_transport_still_fails_there(redis_server: PrivateRedis):
    """Why the transport above exists. When kombu stops failing here, the
    workaround (and this test) can go."""
    connection = _lose_the_server_while_consuming(redis_server, KOMBUS)
    with pytest.raises(AttributeError, match="hostname"):
        connection.close()


def test_our_transport_still_works(redis_server: PrivateRedis):
    """Publish, consume and acknowledge, and a message left unacknowledged by a
    closed channel comes back: the subclass changes nothing else."""
    queue = Queue("work", Exchange("work"), "work")
    with Connection(redis_server.url, transport=OURS) as connection:
        connection.Producer().publish(
            {"n": 1}, exchange=queue.exchange, routing_key="work", declare=[queue]
        )
        first = queue(connection.channel()).get()
        assert first is not None
        assert first.payload == {"n": 1}
        first.channel.close()  # unacknowledged: restored to the queue
        again = queue(connection.channel()).get()
        assert again is not None
        assert again.payload == {"n": 1}
        assert again.delivery_info["redelivered"]
        again.ack()
        assert queue(connection.channel()).get() is None
