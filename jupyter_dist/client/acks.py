"""Tell the controller which results this client has taken in, so that it may drop them.

The controller keeps a result it sent until the client confirms it: a
client killed with results still queued in its socket never had them, and
``get_result`` must still find them. Confirmations leave once per turn of
the client's I/O loop, one message for all the results the turn took in.
"""

from __future__ import annotations

from collections.abc import Callable

from jupyter_dist.protocol import Envelope, MsgType, Session


class ResultAcks:
    """Task ids whose results this turn took in (I/O thread only)."""

    def __init__(self) -> None:
        self._task_ids: list[str] = []

    def add(self, task_id: str) -> None:
        self._task_ids.append(task_id)

    def flush(self, session: Session, send: Callable[[Envelope], None]) -> None:
        """Send one ``result_ack`` for what was added since the last flush, if anything was."""
        if self._task_ids:
            task_ids, self._task_ids = self._task_ids, []
            send(session.envelope(MsgType.RESULT_ACK, {"task_ids": task_ids}))
