"""The engine process: user code on the main thread, sockets on one I/O thread.

The I/O thread registers with the controller, answers with heartbeats,
streams output, queues incoming tasks for the main thread and takes
interrupts, so all of that keeps flowing while user code blocks. The engine
exits by itself when the controller has been silent for
``CONTROLLER_TIMEOUT_S`` or, for a local engine, when its parent (the
controller) is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from types import FrameType
from typing import Any

import zmq

from jupyter_dist import serialize, shm, torch_group
from jupyter_dist.actor_handle import register_caller
from jupyter_dist.connection_file import ClusterInfo
from jupyter_dist.context import EngineContext, set_engine_context, update_engine_context
from jupyter_dist.engine.actors import ActorHost
from jupyter_dist.engine.caller import EngineCaller
from jupyter_dist.engine.executor import Executor, Outcome, plain_error
from jupyter_dist.engine.metrics import MetricsSampler
from jupyter_dist.engine.streams import OutStream, current_task_id
from jupyter_dist.errors import SerializationError
from jupyter_dist.gpus import GpuInfo
from jupyter_dist.ioloop import IOLoop
from jupyter_dist.outbox import Outbox
from jupyter_dist.protocol import Message, MsgType, Session, unpack_or_drop
from jupyter_dist.security import secure_client
from jupyter_dist.start_record import StartRecord

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
# With no task and no actor, nothing changes and nothing can starve the I/O thread:
# beat half as often (each beat wakes this engine and the controller).
IDLE_HEARTBEAT_INTERVAL_S = 2.0
CONTROLLER_TIMEOUT_S = 10.0
REGISTER_TIMEOUT_S = 30.0
ACTOR_STATE_INTERVAL_S = 0.5
# While work runs, resident memory is checked against the limit this often: a task can
# allocate gigabytes a second, and one check (a read of /proc/self/statm) costs microseconds.
MEMORY_CHECK_INTERVAL_S = 0.05
# An interrupted task still running this long after may be blocked in a torch collective,
# which no signal wakes: its group's connections are then shut to end it.
COLLECTIVE_GRACE_S = 1.0


class _TaskQueue:
    """Tasks waiting for the main thread; the I/O thread may take unstarted ones back."""

    def __init__(self) -> None:
        self._items: deque[Message | None] = deque()
        self._ready = threading.Condition()

    def put(self, msg: Message | None) -> None:
        with self._ready:
            self._items.append(msg)
            self._ready.notify()

    def __len__(self) -> int:
        return len(self._items)

    def get(self) -> Message | None:
        with self._ready:
            while not self._items:
                self._ready.wait()
            return self._items.popleft()

    def take_back(self, task_ids: list[str]) -> list[str]:
        """Remove the named tasks that have not started; return their ids."""
        wanted = set(task_ids)
        kept: deque[Message | None] = deque()
        taken: list[str] = []
        with self._ready:
            for msg in self._items:
                task_id = msg.content.get("task_id") if msg is not None else None
                if task_id in wanted:
                    taken.append(task_id)
                else:
                    kept.append(msg)
            self._items = kept
        return taken


class Engine:
    """One engine: connect, register, then run tasks until told to stop."""

    def __init__(self, info: ClusterInfo, requested_id: int | None = None) -> None:
        self.info = info
        self.requested_id = requested_id
        self.engine_id = -1
        self.session = Session(bytes.fromhex(info.key))
        self.host = shm.host_name()
        self.shm_pool = shm.pool_for(info.cluster_id)
        self.loop = IOLoop()
        self.outbox = Outbox(self.session)
        self.loop.at_turn_end(self.outbox.flush)
        self.ctx = zmq.Context()
        self.sock: zmq.Socket[Any] | None = None
        self.tasks = _TaskQueue()
        self.registered = threading.Event()
        self.current_task_id = ""
        self.streams: list[OutStream] = []
        self.is_running_user_code = False
        # What the controller reads if this process is killed: the tasks it had started.
        # Made once registered (in run), so an engine that never runs leaves no file.
        self.start_record: StartRecord | None = None
        self.parent_pid = os.getppid()
        self.last_controller_contact = time.monotonic()
        self.heartbeat_due = self.last_controller_contact  # when the next beat should run
        self.metrics = MetricsSampler()
        self.caller = EngineCaller(info.cluster_id, self._send_threadsafe)
        register_caller(info.cluster_id, self.caller)
        self.actors: ActorHost | None = None  # made with the executor, once registered
        self.is_watching_actor_states = False
        self.early_actor_requests: list[Message] = []
        self.memory_limit_bytes: int | None = None  # from the controller, at registration
        self.is_watching_memory = False
        self.is_over_memory = False  # reported: the controller stops this engine

    # ---- I/O thread -------------------------------------------------

    def _io_main(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        secure_client(sock, self.info)
        sock.connect(self.info.url(self.info.engine_port))
        self.sock = sock
        self.loop.add_socket(sock, self._on_message)
        self._send(
            MsgType.REGISTER_REQUEST,
            {"pid": os.getpid(), "host": socket.gethostname(), "requested_id": self.requested_id},
        )
        self._schedule_heartbeat(HEARTBEAT_INTERVAL_S)
        self.loop.run()
        self.metrics.close()
        sock.close(linger=1000)
        self.loop.close()
        if self.is_running_user_code:
            # Told to stop mid-task, and user code keeps the main thread (maybe for hours):
            # end the process here, once what was sent has left (the socket lingers up to 1 s).
            self.ctx.term()
            self._exit_now()

    def _send(
        self,
        msg_type: MsgType,
        content: dict[str, Any],
        parent: dict[str, Any] | None = None,
        signed: list[Any] | None = None,
        raw: list[Any] | None = None,
    ) -> None:
        assert self.sock is not None  # only called on the I/O thread after connect
        self.outbox.put(
            self.sock,
            self.session.envelope(msg_type, content, parent, None, signed or (), raw or ()),
        )

    def _send_threadsafe(
        self, msg_type: MsgType, content: dict[str, Any], signed: list[Any], raw: list[Any]
    ) -> None:
        self.loop.call_soon_threadsafe(lambda: self._send(msg_type, content, None, signed, raw))

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        unpacked = unpack_or_drop(self.session, frames, "the controller")
        if unpacked is not None:
            self.last_controller_contact = time.monotonic()
            for msg in unpacked[1]:
                self._handle(msg)

    def _handle(self, msg: Message) -> None:
        msg_type = msg.msg_type
        if msg_type == MsgType.TASK_REQUEST:
            if msg.content.get("kind", "").startswith("actor_"):
                self._to_actors(msg)
            else:
                self.tasks.put(msg)
            self._watch_memory()
        elif msg_type in (MsgType.TASK_REPLY, MsgType.RESULT_REPLY):
            self.caller.resolve(msg)
        elif msg_type in (MsgType.STREAM, MsgType.DISPLAY_DATA, MsgType.EXECUTE_RESULT):
            pass  # output of an actor call made from here: it was printed where it ran
        elif msg_type == MsgType.HEARTBEAT_REPLY:
            pass
        elif msg_type == MsgType.ENGINES_CHANGED:
            if self.registered.is_set():
                update_engine_context(n_engines=msg.content["n_engines"])
        elif msg_type == MsgType.REGISTER_REPLY:
            self._on_registered(msg)
        elif msg_type == MsgType.STEAL_REQUEST:
            asked = msg.content["task_ids"]
            self._send(
                MsgType.STEAL_REPLY, {"asked": asked, "task_ids": self.tasks.take_back(asked)}
            )
        elif msg_type == MsgType.INTERRUPT_REQUEST:
            self._interrupt(msg.content.get("task_ids"))
        elif msg_type == MsgType.SHUTDOWN_REQUEST:
            logger.info("engine %d: shutdown requested", self.engine_id)
            self._shutdown()
        else:
            logger.warning("engine %d: ignored an unexpected %s", self.engine_id, msg_type)

    def _to_actors(self, msg: Message) -> None:
        if self.actors is None:
            self.early_actor_requests.append(msg)
        else:
            self.actors.handle(msg)
        self._watch_actor_states()

    def _watch_actor_states(self) -> None:
        """Look for changed actor states every ``ACTOR_STATE_INTERVAL_S`` while actors live here.

        Only then: an idle engine should not wake for nothing (each wake-up of
        a process costs about 0.1 ms of CPU on a small VM, 8 engines add up).
        """
        if not self.is_watching_actor_states:
            self.is_watching_actor_states = True
            self.loop.call_later(ACTOR_STATE_INTERVAL_S, self._send_actor_states)

    def _send_actor_states(self) -> None:
        self.is_watching_actor_states = False
        if self.actors is not None:
            for actor_id, state in self.actors.changed_states():
                self._send(MsgType.ACTOR_STATE, {"actor_id": actor_id, "state": state})
        if self.early_actor_requests or (self.actors is not None and self.actors.has_actors):
            self._watch_actor_states()

    def _on_registered(self, msg: Message) -> None:
        if msg.content.get("status") != "ok":
            logger.error("the controller refused this engine: %s", msg.content.get("reason"))
            self._shutdown()
            return
        self.engine_id = int(msg.content["engine_id"])
        gpus = tuple(
            GpuInfo(g["index"], g["uuid"], g["name"]) for g in self.metrics.gpus.sample(os.getpid())
        )
        set_engine_context(
            EngineContext(
                engine_id=self.engine_id,
                n_engines=int(msg.content.get("n_engines", 1)),
                host=socket.gethostname(),
                pid=os.getpid(),
                gpus=gpus,
            )
        )
        limit = msg.content.get("memory_limit_bytes")
        self.memory_limit_bytes = int(limit) if limit else None
        logger.info(
            "registered as engine %d (memory limit: %s bytes)", self.engine_id, limit or "none"
        )
        self.registered.set()

    def _schedule_heartbeat(self, delay_s: float) -> None:
        self.heartbeat_due = time.monotonic() + delay_s
        self.loop.call_later(delay_s, self._heartbeat)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        # Late by more than a beat: user code held the GIL (a large import, a long computation
        # in C) and this thread could neither beat nor listen. That silence is this engine's
        # own (the controller answers beats it never got), not the controller's.
        late_s = now - self.heartbeat_due
        if late_s > HEARTBEAT_INTERVAL_S:
            self.last_controller_contact += late_s
        silent_s = now - self.last_controller_contact
        if silent_s > CONTROLLER_TIMEOUT_S or os.getppid() != self.parent_pid:
            logger.error("the controller is gone (silent for %.0f s); engine exits", silent_s)
            self._shutdown()
            return
        shm.drop_unused_mappings()  # segments another process removed: their memory goes now
        if self.registered.is_set():
            self._send(
                MsgType.HEARTBEAT_REQUEST,
                {"engine_id": self.engine_id, "metrics": self.metrics.sample()},
            )
            self._check_memory()  # also catches growth the watch missed (it starts with work)
        self._schedule_heartbeat(self._heartbeat_interval_s())

    def _has_work(self) -> bool:
        has_actors = self.actors is not None and self.actors.has_actors
        return self.is_running_user_code or len(self.tasks) > 0 or has_actors

    def _heartbeat_interval_s(self) -> float:
        return HEARTBEAT_INTERVAL_S if self._has_work() else IDLE_HEARTBEAT_INTERVAL_S

    def _watch_memory(self) -> None:
        """Check memory every ``MEMORY_CHECK_INTERVAL_S`` while work is here (a heartbeat is too slow).

        An idle engine is checked at its heartbeats only, so it does not wake for nothing.
        """
        if self.memory_limit_bytes is not None and not self.is_watching_memory:
            self.is_watching_memory = True
            self.loop.call_later(MEMORY_CHECK_INTERVAL_S, self._on_memory_watch)

    def _on_memory_watch(self) -> None:
        self.is_watching_memory = False
        self._check_memory()

    def _check_memory(self) -> None:
        """Tell the controller once when resident memory passes the limit; it stops this engine.

        The controller, not the engine, ends the process: it records why the
        work failed and starts a fresh engine with this id.
        """
        limit = self.memory_limit_bytes
        if limit is None or self.is_over_memory:
            return
        rss_bytes = self.metrics.rss_bytes()
        if rss_bytes <= limit:
            if self._has_work():
                self._watch_memory()
            return
        self.is_over_memory = True
        logger.error(
            "engine %d uses %d bytes, over its limit of %d; asking the controller to stop it",
            self.engine_id,
            rss_bytes,
            limit,
        )
        self._send(MsgType.MEMORY_EXCEEDED, {"engine_id": self.engine_id, "rss_bytes": rss_bytes})

    def _interrupt(self, task_ids: list[str] | None) -> None:
        if not self.is_running_user_code:
            return
        if task_ids and self.current_task_id not in task_ids:
            return
        task_id = self.current_task_id
        logger.info("engine %d: interrupting task %s", self.engine_id, task_id)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        if torch_group.current() is not None:
            self.loop.call_later(COLLECTIVE_GRACE_S, lambda: self._end_collective(task_id))

    def _end_collective(self, task_id: str) -> None:
        """The interrupt did not stop the task: it may be blocked in a torch collective; end that."""
        if self.is_running_user_code and self.current_task_id == task_id:
            shut = torch_group.cut_connections()
            logger.warning(
                "engine %d: task %s ignored the interrupt; shut %d torch group connection(s)",
                self.engine_id,
                task_id,
                shut,
            )

    def _shutdown(self) -> None:
        self.tasks.put(None)
        self.loop.stop()

    def _exit_now(self) -> None:
        """End the process at once, leaving no shared memory behind if the controller was killed."""
        shm.remove_orphaned(self.info)
        os._exit(0)

    def _send_display(self, msg_type: str, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Send a rich output of the running task (main thread), after the text printed before it."""
        for stream in self.streams:
            stream.flush()
        content = {
            "task_id": current_task_id.get(),
            "engine_id": self.engine_id,
            "data": data,
            "metadata": metadata,
        }
        self.loop.call_soon_threadsafe(lambda: self._send(MsgType(msg_type), content))

    def _send_stream(self, name: str, task_id: str, text: str) -> None:
        self._send(
            MsgType.STREAM,
            {"task_id": task_id, "engine_id": self.engine_id, "name": name, "text": text},
        )

    # ---- main thread ------------------------------------------------

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.is_running_user_code:
            raise KeyboardInterrupt

    def run(self) -> None:
        """Run the engine until shutdown; blocks the calling (main) thread."""
        signal.signal(signal.SIGINT, self._on_sigint)
        # Figures made on an engine come back as rich outputs, as in a notebook.
        os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        io_thread = threading.Thread(target=self._io_main, name="jupyter-dist-io", daemon=True)
        io_thread.start()
        if not self.registered.wait(REGISTER_TIMEOUT_S):
            logger.error(
                "no answer from the controller at %s; engine exits",
                self.info.url(self.info.engine_port),
            )
            self.loop.stop()
            io_thread.join(5)
            return
        self.streams = [
            OutStream(name, self._send_stream, self.loop.call_soon_threadsafe, self.loop.call_later)
            for name in ("stdout", "stderr")
        ]
        sys.stdout, sys.stderr = self.streams
        self.start_record = StartRecord.create(self.info.cluster_id, os.getpid())
        executor = Executor(
            self.engine_id, self._send_display, self.caller.fetch_result, self.shm_pool
        )
        self.loop.call_soon_threadsafe(lambda: self._start_actors(executor))
        while (msg := self.tasks.get()) is not None:
            self._run_task(executor, msg)
        io_thread.join(5)
        if self.start_record is not None:
            self.start_record.remove()
        # Last, after this engine's last send: a killed controller removes nothing, so each
        # engine removes the cluster's segments as it exits, and the last one out gets them all.
        shm.remove_orphaned(self.info)

    def _start_actors(self, executor: Executor) -> None:
        self.actors = ActorHost(executor, self._send_reply)
        for msg in self.early_actor_requests:
            self.actors.handle(msg)
        self.early_actor_requests.clear()

    def _run_task(self, executor: Executor, msg: Message) -> None:
        content = msg.content
        task_id = content["task_id"]
        self.current_task_id = task_id
        current_task_id.set(task_id)
        started = time.time()
        signed = msg.signed_buffers
        if self.start_record is not None:
            self.start_record.mark(task_id)
        self.is_running_user_code = True
        try:
            raw_in = shm.import_buffers(self.shm_pool, msg.raw_buffers, content.get("shm", []))
            outcome = executor.run(content, signed[0] if signed else None, raw_in)
        except SerializationError as e:
            outcome = Outcome(
                error={"ename": "SerializationError", "evalue": str(e), "traceback": str(e)}
            )
        except KeyboardInterrupt:
            outcome = Outcome(
                error={"ename": "KeyboardInterrupt", "evalue": "", "traceback": "KeyboardInterrupt"}
            )
        except Exception as e:  # the task boundary: a malformed request must not end the engine
            logger.exception("engine %d: task %s could not run", self.engine_id, task_id)
            outcome = Outcome(error=plain_error(e))
        finally:
            self.is_running_user_code = False
        self._send_reply(msg, outcome, started)

    def _send_reply(self, msg: Message, outcome: Outcome, started: float) -> None:
        """Serialize the outcome of a task or actor call (calling thread) and send the reply.

        What the call printed is sent first, so it reaches the client before the reply.
        """
        for stream in self.streams:
            stream.flush()
        content = msg.content
        task_id = content["task_id"]
        reply = {
            "task_id": task_id,
            "engine_id": self.engine_id,
            "status": "ok",
            "started": started,
            "finished": time.time(),
        }
        pickled: bytes = b""
        raw: list[memoryview] = []
        if outcome.error is None:
            try:
                pickled, raw = serialize.serialize(outcome.value, f"the result of task {task_id}")
                if content.get("client_host") == self.host:  # the client maps it, no socket
                    raw, reply["shm"] = shm.export_buffers(self.shm_pool, raw)
            except SerializationError as e:
                outcome.error = {
                    "ename": "SerializationError",
                    "evalue": str(e),
                    "traceback": str(e),
                }
        if outcome.error is not None:
            reply["status"] = "error"
            reply["error"] = outcome.error
            pickled, raw = b"", []
        signed_out = [pickled] if pickled else []
        self.loop.call_soon_threadsafe(
            lambda: self._send(MsgType.TASK_REPLY, reply, dict(msg.header), signed_out, raw)
        )
