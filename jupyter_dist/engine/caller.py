"""Work an engine asks of the cluster: actor calls from handles passed to it, and other tasks' results.

User code on any thread of the engine makes the request; the I/O thread
sends it (through ``send``) and resolves the future when the controller
answers (``resolve``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from jupyter_dist.errors import ClusterError, SerializationError
from jupyter_dist.futures import Future, error_from_reply
from jupyter_dist.protocol import Buffer, Message, MsgType, new_id
from jupyter_dist.serialize import deserialize, serialize

FETCH_TIMEOUT_S = 3600.0

# (message type, content, signed buffers, raw buffers) -> sends to the controller (any thread).
Sender = Callable[[MsgType, dict[str, Any], list[Buffer], list[Buffer]], None]


class EngineCaller:
    """The engine's side of ``ActorCaller``, plus fetching the value of any task by id."""

    def __init__(self, cluster_id: str, send: Sender) -> None:
        self.cluster_id = cluster_id
        self._send = send
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}

    def _expect(self, task_id: str) -> Future:
        future = Future(task_id)
        with self._lock:
            self._pending[task_id] = future
        return future

    def call_actor(
        self, actor_id: str, label: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future:
        pickled, raw = serialize((args, kwargs), f"the arguments of {label}.{method}")
        task_id = new_id()
        future = self._expect(task_id)
        content = {
            "task_id": task_id,
            "kind": "actor_call",
            "actor_id": actor_id,
            "method": method,
            "target": None,
        }
        self._send(MsgType.TASK_REQUEST, content, [pickled], list(raw))
        return future

    def kill_actor(self, actor_id: str) -> Future:
        task_id = new_id()
        future = self._expect(task_id)
        self._send(
            MsgType.TASK_REQUEST,
            {"task_id": task_id, "kind": "actor_kill", "actor_id": actor_id, "target": None},
            [],
            [],
        )
        return future

    def fetch_result(self, task_id: str) -> Any:
        """The value of task ``task_id`` (waiting for it to finish); raises its error."""
        future = self._expect(task_id)
        self._send(MsgType.RESULT_REQUEST, {"task_ids": [task_id]}, [], [])
        return future.result(FETCH_TIMEOUT_S)

    def resolve(self, msg: Message) -> None:
        """Settle the future a ``task_reply`` or ``result_reply`` answers (I/O thread)."""
        content = msg.content
        status = content.get("status")
        if status == "pending":
            return
        with self._lock:
            future = self._pending.pop(content.get("task_id", ""), None)
        if future is None or future.done():
            return
        if status == "ok":
            signed = msg.signed_buffers
            try:
                what = f"the result of task {future.id}"
                future.set_result(deserialize(signed[0], msg.raw_buffers, what) if signed else None)
            except SerializationError as e:
                future.set_exception(e)
        elif status == "error":
            future.set_exception(error_from_reply(content, self.cluster_id))
        else:
            future.set_exception(
                ClusterError(f"The cluster has no result for task {future.id} ({status}).")
            )
