"""kombu's Redis transport, with a worker that survives a Redis restart.

With kombu 5.7 and Celery 5.7, a worker whose Redis goes away while it holds an
unacknowledged message (``task_acks_late``) can die of it: ``CRITICAL
Unrecoverable error: AttributeError("'NoneType' object has no attribute
'hostname'")``, right after ``Restoring 1 unacknowledged message(s)``. How:

1. Celery's consumer, on losing the broker, calls ``Connection.collect()``
   (celery/worker/consumer/consumer.py, ``on_connection_error_after_connected``).
   That closes the channels, ignoring connection errors, and then drops the
   transport's reference to its connection (kombu/connection.py,
   ``_do_close_transport``: ``self._transport.client = None``).
2. A channel's close can stop half-way on a connection error, before it counts
   as closed: the task channel's, when a BRPOP was in flight (kombu/transport/
   redis.py, ``Channel.close`` reads its reply from the dead socket first); and
   the transport's loop over its channels (kombu/transport/virtual/base.py,
   ``Transport.close_connection``) stops at the first channel that raises (the
   remote-control channel, deleting its fanout queue on the dead server), so the
   task channel is never closed there.
3. Celery then closes the connection once more (added in celery#10242, the fix
   for celery#9705, to release the broken socket): the task channel's close now
   gets as far as restoring its unacknowledged messages
   (``QoS.restore_unacked``), which needs a new connection pool, whose
   parameters come from the transport's connection: ``None``
   (``Channel._connparams``: ``conninfo.hostname``). An ``AttributeError`` is
   not a connection error, so nothing on the way catches it and the worker exits.

It is the old failure of kombu#582 and kombu#970 (a Redis channel building a
new client after its transport let go of its connection) on a new path; it
needs a BRPOP in flight (a free prefetch slot) when Redis goes away, so it
is a race. This transport's channel says what is true instead: once its
transport has let go of its connection, it cannot reach Redis, and it raises a
connection error, which Celery and kombu expect of a broker that went away.
The unacknowledged messages stay in Redis's unacked set, exactly as when the
restore fails because Redis is down: Redis redelivers them after
``visibility_timeout``, and celery-tx's sweeps resume their steps well before.

Use it with ``broker_transport = "celery_tx.drivers.celery_tasks.redis_broker:Transport"``
(the project's ``celeryconfig.py`` does, for ``redis://`` and ``rediss://`` URLs).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    """A Redis channel that, once its connection was collected, fails as unreachable."""

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is not None and transport.client is None:
            # kombu's own would raise AttributeError here (see the module's docstring).
            raise RedisConnectionError(
                "the broker connection of this channel was closed (Connection.collect)"
            )
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
