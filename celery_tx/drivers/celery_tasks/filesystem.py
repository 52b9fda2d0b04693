"""kombu's filesystem transport, made safe for several processes: the embedded broker.

kombu 5.7's ``filesystem`` transport creates a message's file and then writes
it, while a consumer in another process may already move and read it: the
consumer gets an empty file and the worker stops on a JSON error (seen at a
10 ms polling interval). When it is not keeping processed messages, it moves
each one to the system temporary folder, which may be another file system,
where a move is a copy that two consumers can both make.

This transport writes each message under a temporary name and renames it into
place, so a consumer only ever sees whole messages; and it claims a message by
renaming it into the processed folder, on the same file system, so exactly one
consumer gets it. A message put back (its worker died before acknowledging it)
says it was redelivered where Celery reads it, as on Redis and RabbitMQ. Use
it with ``broker_transport = "celery_tx.drivers.celery_tasks.filesystem:Transport"``
(the project's ``celeryconfig.py`` does, for the embedded default).
"""

from __future__ import annotations

import os
import uuid
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps, loads


class Channel(filesystem.Channel):
    """A filesystem channel whose puts are atomic and whose gets are exclusive."""

    # kombu's own base classes disagree on this signature; this is the filesystem one.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # Zero-padded: consumers take messages in the order of their names.
        name = f"{round(monotonic() * 1000):015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.writing"  # not "<queue>.msg": consumers skip it
        try:
            with open(partial, "w", encoding="utf-8") as f:
                f.write(dumps(payload))  # type: ignore[no-untyped-call]
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        wanted = f"{queue}.msg"
        claimed_folder = self.processed_folder if self.store_processed else self.data_folder_in
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(claimed_folder, f"{name}.{uuid.uuid4().hex}.claimed")
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another consumer claimed it first
            try:
                with open(claimed, encoding="utf-8") as f:
                    payload = f.read()
                if not self.store_processed:
                    os.remove(claimed)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {claimed!r}") from exc
            return loads(payload)  # type: ignore[no-untyped-call]
        raise Empty()

    def _restore(self, message: Any) -> None:
        # kombu's virtual Channel._restore (kombu 5.7, transport/virtual/base.py)
        # marks the payload ``redelivered`` at its top level, which its Message
        # never reads: the worker would see a first delivery. Redis's transport
        # marks delivery_info, where Celery's request (and the step's attempt
        # count) reads it; so does this.
        delivery_info = message.delivery_info
        payload = message.serializable()
        payload["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
        payload.setdefault("headers", {})["redelivered"] = True
        lookup: Any = self._lookup  # untyped in kombu
        for queue in lookup(delivery_info["exchange"], delivery_info["routing_key"]):
            self._put(queue, payload)


class Transport(filesystem.Transport):
    """The filesystem transport with ``Channel`` above."""

    Channel = Channel
