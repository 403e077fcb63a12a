"""Send what one turn of a loop produced as one wire message per peer.

Each ZeroMQ send, receive and wake-up costs the same for a no-op task's
reply as for a page of results, and at thousands of tasks a second those
fixed costs were most of every process's time. So a process does not send
at once: it puts messages here, and when its loop's turn ends each peer
gets what was put for it, one message alone as it is, several as one
signed batch. Nothing waits for a batch to fill; a lone message leaves at
the end of the same turn, so latency is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from jupyter_dist.protocol import Envelope, Session, send

logger = logging.getLogger(__name__)

# Most messages in one batch: bounds the work a receiver does before its first reply.
MAX_BATCH_MESSAGES = 256

OnUnreachable = Callable[[], None] | None


class Outbox:
    """Messages waiting for the end of the loop's turn, per (socket, routing id)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._pending: dict[
            tuple[zmq.Socket[Any], bytes], list[tuple[Envelope, OnUnreachable]]
        ] = {}

    def put(
        self,
        sock: zmq.Socket[Any],
        envelope: Envelope,
        ident: bytes = b"",
        on_unreachable: OnUnreachable = None,
    ) -> None:
        """Send ``envelope`` at the end of this turn; ``on_unreachable()`` if its peer is gone.

        ``ident`` routes it through a ROUTER socket. A peer is unreachable when
        a ROUTER_MANDATORY socket no longer knows it.
        """
        self._pending.setdefault((sock, ident), []).append((envelope, on_unreachable))

    def flush(self) -> None:
        """Send everything put so far; what the unreachable-callbacks put goes too."""
        while self._pending:
            pending, self._pending = self._pending, {}
            for (sock, ident), entries in pending.items():
                for start in range(0, len(entries), MAX_BATCH_MESSAGES):
                    self._send(sock, ident, entries[start : start + MAX_BATCH_MESSAGES])

    def _send(
        self, sock: zmq.Socket[Any], ident: bytes, entries: list[tuple[Envelope, OnUnreachable]]
    ) -> None:
        frames = self.session.frames([envelope for envelope, _ in entries])
        try:
            send(sock, frames, [ident] if ident else ())
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            for _, on_unreachable in entries:
                if on_unreachable is not None:
                    on_unreachable()
