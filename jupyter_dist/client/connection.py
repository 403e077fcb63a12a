"""The client's link to a controller: one daemon I/O thread that owns the socket.

The notebook's main thread may be blocked in a cell, so replies and output
are received here and handed over through ``concurrent.futures`` futures.
Other threads never touch the socket: they hand their sends to the loop.

A controller that dies must not leave a cell waiting forever: every
second the I/O thread checks that the controller lives, by its pid on
this host, or on another host by its answers to a beat it sends. When it is gone, every
pending future and every later call fails with ``ControllerGoneError``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from jupyter_dist import shm
from jupyter_dist.actor_handle import register_caller, unregister_caller
from jupyter_dist.client.acks import ResultAcks
from jupyter_dist.client.output import OutputGroup, OutputRouter
from jupyter_dist.connection_file import ClusterInfo, is_alive
from jupyter_dist.errors import (
    ClusterError,
    ControllerGoneError,
    DistTimeoutError,
    EngineDiedError,
    SerializationError,
)
from jupyter_dist.futures import Future, error_from_reply
from jupyter_dist.ioloop import IOLoop
from jupyter_dist.outbox import Outbox
from jupyter_dist.protocol import (
    Buffer,
    Envelope,
    Message,
    MsgType,
    Session,
    new_id,
    unpack_or_drop,
)
from jupyter_dist.security import secure_client
from jupyter_dist.serialize import deserialize, note_senders_cuda_device, serialize
from jupyter_dist.torch_group import TorchGroup

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
# A controller on another host that answers none of this many seconds of beats is gone.
# On this host its pid says so at once, and a busy controller is never taken for dead.
CONTROLLER_SILENCE_S = 4.0


class Connection:
    """Sends requests to a controller and resolves futures from its replies."""

    def __init__(self, info: ClusterInfo) -> None:
        self.info = info
        self.session = Session(bytes.fromhex(info.key))
        self._loop = IOLoop()
        self._outbox = Outbox(self.session)
        self._acks = ResultAcks()
        # Before the outbox's flush, so that the acks of a turn leave in that turn.
        self._loop.at_turn_end(lambda: self._acks.flush(self.session, self._send))
        self._loop.at_turn_end(self._outbox.flush)
        self.output = OutputRouter(self._loop.call_later)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock: zmq.Socket[Any] | None = None
        self.state: dict[str, Any] = {}  # the controller's latest published state
        # Each is called with every newer state, on the thread that took it (mostly the I/O
        # thread): it must be quick and must not block. Monitors hand the state on from here.
        self.state_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.engine_ids: list[int] = []  # live engines, as last published or asked
        self._tasks: dict[str, Future] = {}
        self._requests: dict[str, concurrent.futures.Future[Message]] = {}
        self._is_closed = False
        self._gone: ControllerGoneError | None = None  # set once the controller is found gone
        self._is_controller_local = info.host == socket.gethostname()
        self._last_heard = time.monotonic()
        self._execution_count = 0
        self.torch_group: TorchGroup | None = None  # the group c.torch() formed, if any
        self.host = shm.host_name()
        self.shm_pool = shm.pool_for(info.cluster_id)
        register_caller(info.cluster_id, self)  # actor handles in this process call through here
        self._thread = threading.Thread(
            target=self._io_main, name="jupyter-dist-client-io", daemon=True
        )
        self._thread.start()

    # ---- any thread -----------------------------------------------------

    def request(
        self, msg_type: MsgType, content: dict[str, Any], timeout_s: float = 10.0
    ) -> Message:
        """Send a request to the controller and wait for its reply."""
        future: concurrent.futures.Future[Message] = concurrent.futures.Future()
        msg_id = new_id()

        def go() -> None:
            self._requests[msg_id] = future
            self._send(self.session.envelope(msg_type, content, msg_id=msg_id))

        self._call(go)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            self._call(lambda: self._forget_request(msg_id))
            raise DistTimeoutError(
                f"The controller of cluster {self.info.cluster_id!r} did not answer a {msg_type} "
                f"within {timeout_s} s. Is it running? `jupyter-dist list` shows the running clusters."
            ) from None

    def submit(
        self,
        content: dict[str, Any],
        signed: Sequence[Buffer] = (),
        raw: Sequence[Buffer] = (),
        output: OutputGroup | None = None,
    ) -> Future:
        """Send a task request; the future resolves with its result, its output goes to ``output``."""
        task_id = content["task_id"]
        note_senders_cuda_device()  # results are unpickled on the I/O thread: use this thread's GPU
        content["client_host"] = self.host  # engines on this host reply through shared memory
        content["acks"] = True  # the controller keeps the result until this client confirms it
        future = Future(task_id, content.get("target"), on_cancel=lambda: self.cancel([task_id]))
        group = output or self.output.new_group(None)

        def go() -> None:
            self._tasks[task_id] = future
            self.output.add_task(task_id, group)
            self._send(
                self.session.envelope(
                    MsgType.TASK_REQUEST, content, signed_buffers=signed, raw_buffers=raw
                )
            )

        self._call(go)
        return future

    def export_buffers(
        self, raw: list[memoryview], engine_ids: list[int] | None, shared: bool
    ) -> tuple[list[memoryview], list[list[Any]]]:
        """Put large buffers for ``engine_ids`` (None: any live engine) into shared memory if all are on this host.

        Runs on the calling thread, so the copy never holds up the I/O thread.
        """
        has_large = any(b.nbytes >= shm.SHM_MIN_NBYTES for b in raw)
        if not (has_large and self.shares_memory_with(engine_ids)):
            return raw, []
        return shm.export_buffers(self.shm_pool, raw, shared)

    def shares_memory_with(self, engine_ids: list[int] | None) -> bool:
        """Whether this process and all of ``engine_ids`` (None: every live engine) share a host's memory."""
        if self.shm_pool is None:
            return False
        engines = self.state.get("engines", [])
        wanted = [e for e in engines if e["state"] != "dead"]
        if engine_ids is not None:
            wanted = [e for e in engines if e["engine_id"] in engine_ids]
        return bool(wanted) and all(e.get("host") == self.host for e in wanted)

    def fetch(self, task_id: str) -> Future:
        """A future for a task submitted by any client, resolved from the controller's store."""
        future = Future(task_id)
        group = self.output.new_group(None)

        def go() -> None:
            self._tasks[task_id] = future
            self.output.add_task(task_id, group)
            self._send(self.session.envelope(MsgType.RESULT_REQUEST, {"task_ids": [task_id]}))

        self._call(go)
        return future

    def next_execution_count(self) -> int:
        """The number engines give a cell they run: the notebook's own, or a count of runs."""
        shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
        self._execution_count = (
            shell.execution_count if shell is not None else self._execution_count + 1
        )
        return self._execution_count

    def call_actor(
        self, actor_id: str, label: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future:
        """Call a method of an actor (any thread); each thread's calls keep their order."""
        pickled, raw = serialize((args, kwargs), f"the arguments of {label}.{method}")
        content = {
            "task_id": new_id(),
            "kind": "actor_call",
            "actor_id": actor_id,
            "method": method,
            "target": None,
        }
        return self.submit(content, [pickled], raw, self.output.new_group(None, label))

    def kill_actor(self, actor_id: str) -> Future:
        content = {"task_id": new_id(), "kind": "actor_kill", "actor_id": actor_id, "target": None}
        return self.submit(content)

    def cancel(self, task_ids: list[str]) -> None:
        self._call(
            lambda: self._send(
                self.session.envelope(MsgType.CANCEL_REQUEST, {"task_ids": task_ids})
            )
        )

    def interrupt(
        self, task_ids: list[str] | None = None, engine_ids: list[int] | None = None
    ) -> None:
        content = {"task_ids": task_ids, "engine_ids": engine_ids}
        self._call(lambda: self._send(self.session.envelope(MsgType.INTERRUPT_REQUEST, content)))

    def close(self) -> None:
        """Stop the I/O thread and close the socket; pending futures fail."""
        if self._is_closed:
            return
        self._is_closed = True
        unregister_caller(self.info.cluster_id, self)
        if self._gone is None:  # else the loop ended itself
            self._loop.stop()
        self._thread.join(5)

    def _forget_request(self, msg_id: str) -> None:
        self._requests.pop(msg_id, None)

    @property
    def is_controller_gone(self) -> bool:
        return self._gone is not None

    def _call(self, fn: Callable[[], None]) -> None:
        if self._gone is not None:
            raise self._gone
        if self._is_closed:
            raise ClusterError(
                f"This client is closed; reconnect with `jd.Cluster.connect({self.info.cluster_id!r})`."
            )
        self._loop.call_soon_threadsafe(fn)

    # ---- I/O thread -----------------------------------------------------

    def _io_main(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        secure_client(sock, self.info)
        sock.connect(self.info.url(self.info.client_port))
        self._sock = sock
        self._loop.add_socket(sock, self._on_message)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        secure_client(sub, self.info)
        sub.connect(self.info.url(self.info.pub_port))
        self._loop.add_socket(sub, self._on_message)
        self._loop.call_later(HEARTBEAT_INTERVAL_S, self._heartbeat)
        try:
            self._loop.run()
        finally:
            sub.close(linger=0)
            sock.close(linger=0 if self._gone else 1000)
            self._loop.close()
            self._ctx.term()
            self._fail_pending(
                self._gone
                or ClusterError(
                    f"The client of cluster {self.info.cluster_id!r} was closed before this finished."
                )
            )

    def _fail_pending(self, error: ClusterError) -> None:
        for future in [*self._tasks.values(), *self._requests.values()]:
            if not future.done():
                future.set_exception(error)
        self._tasks.clear()
        self._requests.clear()

    def _heartbeat(self) -> None:
        """End everything if the controller is gone; to one on another host, send a beat to answer."""
        if self._is_controller_local:  # no message: an idle cluster's controller sleeps on
            reason = (
                None if is_alive(self.info) else f"its process {self.info.controller_pid} ended"
            )
        else:
            silent_s = time.monotonic() - self._last_heard
            reason = (
                f"it did not answer for {silent_s:.0f} s"
                if silent_s > CONTROLLER_SILENCE_S
                else None
            )
        if reason is not None:
            self._gone = ControllerGoneError(self.info.cluster_id, reason)
            logger.error("%s", self._gone)
            self._fail_pending(self._gone)
            shm.remove_orphaned(self.info)  # a killed controller removed none of its segments
            shm.drop_unused_mappings()
            self._loop.stop()
            return
        if not self._is_controller_local:
            self._send(self.session.envelope(MsgType.HEARTBEAT_REQUEST, {}))
        self._loop.call_later(HEARTBEAT_INTERVAL_S, self._heartbeat)

    def _send(self, envelope: Envelope) -> None:
        assert self._sock is not None
        self._outbox.put(self._sock, envelope)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        unpacked = unpack_or_drop(self.session, frames, "the controller")
        if unpacked is not None:
            self._last_heard = time.monotonic()
            for msg in unpacked[1]:
                self._handle(msg)

    def _handle(self, msg: Message) -> None:
        content = msg.content
        if msg.msg_type == MsgType.STREAM:
            self.output.on_stream(
                content["task_id"], content["engine_id"], content["name"], content["text"]
            )
        elif msg.msg_type in (MsgType.DISPLAY_DATA, MsgType.EXECUTE_RESULT):
            self.output.on_display(
                content["task_id"],
                content["engine_id"],
                msg.msg_type,
                content["data"],
                content["metadata"],
            )
        elif msg.msg_type in (MsgType.TASK_REPLY, MsgType.RESULT_REPLY):
            self._resolve_task(msg)
        elif msg.msg_type == MsgType.STATE:
            self.update_state(msg.content)
        elif msg.msg_type != MsgType.HEARTBEAT_REPLY:
            future = self._requests.pop(msg.parent.get("msg_id", ""), None)
            if future is not None and not future.done():
                future.set_result(msg)

    def update_state(self, state: dict[str, Any]) -> None:
        """Take a state published by, or asked of, the controller (any thread: one assignment each)."""
        if state.get("seq", 0) < self.state.get("seq", 0):
            return  # older than the one held: a status reply that crossed a publication
        self.state = state
        self.engine_ids = [e["engine_id"] for e in state["engines"] if e["state"] != "dead"]
        for listener in list(self.state_listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("a state listener failed")

    def _resolve_task(self, msg: Message) -> None:
        content = msg.content
        status = content.get("status")
        task_id = content.get("task_id", "")
        if status == "pending":
            return
        self._acks.add(task_id)  # taken in: the controller may drop it
        future = self._tasks.pop(task_id, None)
        if future is None or future.done():
            return
        engine_id = content.get("engine_id")
        self.output.on_task_done(task_id, engine_id)
        if engine_id is not None:
            future.engine = engine_id
        if status == "ok":
            signed = msg.signed_buffers
            try:
                raw = shm.import_buffers(self.shm_pool, msg.raw_buffers, content.get("shm", []))
                value = (
                    deserialize(signed[0], raw, f"the result of task {task_id}") if signed else None
                )
            except SerializationError as e:
                future.set_exception(e)
                return
            future.set_result(value)
        elif status == "error":
            ranks = self.torch_group.ranks if self.torch_group is not None else {}
            error = error_from_reply(content, self.info.cluster_id, ranks)
            if isinstance(error, EngineDiedError):  # before the next published state says so
                self.engine_ids = [i for i in self.engine_ids if i != error.engine_id]
            future.set_exception(error)
        else:
            future.set_exception(
                ClusterError(
                    f"Cluster {self.info.cluster_id!r} has no result for task {task_id} ({status}): "
                    "it is unknown, was cancelled, or its result was dropped from the history."
                )
            )
