"""The controller: one process per cluster that routes work and outlives every client.

One thread, one poll loop, all state owned here (no locks). Clients connect
to a ROUTER, engines to another, monitors subscribe to a PUB socket.
Load-balanced tasks wait here until the scheduler places them (least
outstanding work, pipelined, with stealing); direct tasks go straight to
their engine; actor calls go to their actor's engine. ROUTER sockets would
drop messages at their high-water mark, so both are unlimited and
``ROUTER_MANDATORY``: the queues live here, and a send to a vanished peer
raises instead of vanishing. Results are kept until a client has them.

The module is longer than our 600-line guide because every handler here
changes the same state in one thread; the pure bookkeeping lives beside it
(registry, scheduler, tasks, actors) and this class only routes messages.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar

import psutil
import zmq

from jupyter_dist import connection_file, shm, start_record
from jupyter_dist.connection_file import ClusterInfo
from jupyter_dist.controller import memory
from jupyter_dist.controller.actors import ActorRecord, ActorRegistry, place
from jupyter_dist.controller.registry import EngineRecord, EngineRegistry
from jupyter_dist.controller.scheduler import BalancedQueue
from jupyter_dist.controller.tasks import TaskRecord, TaskState, TaskStore
from jupyter_dist.ioloop import IOLoop
from jupyter_dist.outbox import OnUnreachable, Outbox
from jupyter_dist.protocol import Envelope, Message, MsgType, Session, new_id, unpack_or_drop
from jupyter_dist.security import is_reachable_from_other_hosts, secure_server, server_keypair

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 4.0
# Heartbeat timeouts and launches are checked this often; exits of forked engines are
# reported by their template as they happen.
CHECK_INTERVAL_S = 1.0
# A change of state is published this long after it, with the changes made meanwhile.
PUBLISH_DELAY_S = 0.25
ORPHAN_TIMEOUT_S = 20.0
# A local engine silent this long has its CPU time read at each check, so that one check
# before the timeout there is a reading to compare with. Past an idle engine's beat
# interval (2 s), so that idle engines cost no reading.
CPU_READ_AFTER_S = HEARTBEAT_TIMEOUT_S - 1.5 * CHECK_INTERVAL_S
# An engine hears from the controller at least every this many heartbeats (it gives up
# after 10 s of silence); replying to each one cost two wake-ups per engine and second.
HEARTBEATS_PER_REPLY = 3
SHUTDOWN_GRACE_S = 3.0
GC_THRESHOLDS = (50_000, 20, 50)

# Starts one local engine: (connection file, requested engine id, environment to set in it)
# -> Popen-like handle.
EngineStarter = Callable[[str, int | None, dict[str, str]], Any]


def _router(ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def _bind(sock: zmq.Socket[Any], ip: str) -> int:
    sock.bind(f"tcp://{ip}:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


class Controller:
    """Registers engines, routes and schedules tasks, keeps results, publishes state."""

    def __init__(
        self,
        cluster_id: str | None = None,
        ip: str = "127.0.0.1",
        start_engine: EngineStarter | None = None,
        orphan_timeout_s: float = ORPHAN_TIMEOUT_S,
        idle_timeout_s: float | None = None,
        memory_limit_bytes: int | None = None,
        engine_gpus: list[str] | None = None,
    ) -> None:
        self.cluster_id = cluster_id or secrets.token_hex(4)
        self.ip = ip
        self.key = secrets.token_bytes(32)
        self.session = Session(self.key)
        self.start_engine = start_engine
        self.orphan_timeout_s = orphan_timeout_s
        self.idle_timeout_s = idle_timeout_s  # stop after this long without work (None: never)
        self.memory_limit_bytes = memory_limit_bytes  # per engine; engines watch it themselves
        self.engine_gpus = engine_gpus or []  # engine k's CUDA_VISIBLE_DEVICES, also on restart
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.clients = _router(self.ctx)
        self.engines = _router(self.ctx)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.loop = IOLoop()
        self.outbox = Outbox(self.session)
        self.is_dispatch_due = False  # balanced work arrived or engines freed up this turn
        self.loop.at_turn_end(self._dispatch_if_due)
        self.have_engines_changed = False  # engines joined or died this turn: tell the engines
        self.loop.at_turn_end(self._tell_engines_if_changed)
        self.loop.at_turn_end(self.outbox.flush)
        self.registry = EngineRegistry()
        self.actors = ActorRegistry()
        self.shm_pool = shm.pool_for(self.cluster_id)
        self.tasks = TaskStore(on_unused_segments=self._remove_segments)
        self.balanced = BalancedQueue()
        self.stealing: set[str] = set()  # task ids asked back from engines to move them
        self.cancelling: set[str] = set()  # task ids asked back from engines to cancel them
        self.launching: dict[int, Any] = {}  # pid -> handle of started, unregistered engines
        self.launch_failures: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.last_engine_seen = self.started
        self.last_check = self.started  # when liveness was last checked
        self.is_publish_due = False  # something changed: a publication is scheduled
        self.is_shutting_down = False
        self.watched_templates: set[int] = set()  # the report pipes of engine templates
        self.last_busy = self.started  # when work last arrived, ran, or a result was asked for
        self.state_seq = 0  # numbers each published state, so monitors can order them
        self.published_state: dict[str, Any] = {}
        self.connection_path = ""
        self.finished_at_release = 0  # tasks finished when memory was last given back

    # ---- life cycle ---------------------------------------------------

    def start(self, n_engines: int = 0) -> str:
        """Bind, write the connection file and start ``n_engines`` local engines.

        Listening beyond loopback, every socket is a CurveZMQ server: encrypted.
        """
        curve_public = b""
        if is_reachable_from_other_hosts(self.ip):
            curve_public, curve_secret = server_keypair()
            for sock in (self.clients, self.engines, self.pub):
                secure_server(sock, curve_public, curve_secret)
        ports = {
            name: _bind(sock, self.ip)
            for name, sock in (
                ("client_port", self.clients),
                ("engine_port", self.engines),
                ("pub_port", self.pub),
            )
        }
        info = ClusterInfo(
            cluster_id=self.cluster_id,
            key=self.key.hex(),
            ip=self.ip,
            controller_pid=os.getpid(),
            host=socket.gethostname(),
            created=time.time(),
            curve_public_key=curve_public.decode(),
            **ports,
        )
        connection_file.list_running()  # removes files of controllers that died
        self.connection_path = str(connection_file.write(info))
        logger.info(
            "cluster %s listening on %s%s, connection file %s",
            self.cluster_id,
            self.ip,
            " (CurveZMQ)" if curve_public else "",
            self.connection_path,
        )
        self.loop.add_socket(self.clients, self._on_client_message)
        self.loop.add_socket(self.engines, self._on_engine_message)
        self.loop.call_later(CHECK_INTERVAL_S, self._check_engines)
        self._state_changed()
        for engine_id in range(n_engines):
            self._launch_engine(engine_id)
        return self.connection_path

    def serve(self) -> None:
        """Run until shut down; then close sockets and remove the connection file."""
        # The records kept here are long-lived and acyclic, and every message allocates;
        # with CPython's default thresholds (a collection per 700 allocations) a profile
        # at 3,000 tasks/s showed 30% of this process's time in the cyclic collector.
        gc.set_threshold(*GC_THRESHOLDS)
        gc.freeze()  # what start-up made is never garbage: keep it out of every scan
        try:
            self.loop.run()
        finally:
            self._close()

    def _launch_engine(self, engine_id: int) -> None:
        if self.start_engine is None:
            return
        environ = {}
        if engine_id < len(self.engine_gpus):
            environ["CUDA_VISIBLE_DEVICES"] = self.engine_gpus[engine_id]
        handle = self.start_engine(self.connection_path, engine_id, environ)
        self.launching[handle.pid] = handle
        template = getattr(handle, "template", None)  # a forked engine's: it reports exits
        if template is not None and template.fileno() not in self.watched_templates:
            self.watched_templates.add(template.fileno())
            self.loop.add_reader(template.fileno(), lambda: self._on_template_report(template))

    def _on_template_report(self, template: Any) -> None:
        self._check_exits()
        if template.has_ended:  # engines it forked are now checked once a second
            self.loop.remove_reader(template.fileno())
            self.watched_templates.discard(template.fileno())

    def _remove_segments(self, names: list[str]) -> None:
        """Segments of finished tasks: taken by their receivers, or never to be (a broadcast's
        sender killed before it removed it, a task cancelled or failed before it ran)."""
        if self.shm_pool is not None:
            self.shm_pool.unlink([(name, 0, True) for name in names])

    def _close(self) -> None:
        if self.shm_pool is not None:
            self.shm_pool.remove_all()  # segments nobody received, or that receivers still held
        # Last: a client that sees the file gone may give back its mappings of the segments.
        if self.connection_path:
            os.unlink(self.connection_path) if os.path.exists(self.connection_path) else None
        for sock in (self.clients, self.engines, self.pub):
            sock.close(linger=0)
        self.loop.close()
        self.ctx.term()
        logger.info("cluster %s stopped", self.cluster_id)

    def shutdown(self) -> None:
        """Stop every engine (kill those that linger), then end the loop."""
        logger.info("shutting down cluster %s", self.cluster_id)
        self.is_shutting_down = True  # engines that end now were told to
        for engine in self.registry.live():
            self._send_engine(engine, MsgType.SHUTDOWN_REQUEST, {})
        handles = [e.process for e in self.registry.all() if e.process is not None]
        handles += list(self.launching.values())
        deadline = time.monotonic() + SHUTDOWN_GRACE_S

        def finish() -> None:
            alive = [h for h in handles if h.poll() is None]
            if alive and time.monotonic() < deadline:
                self.loop.call_later(0.05, finish)
                return
            for handle in alive:
                logger.warning("engine pid %d did not stop; killing it", handle.pid)
                handle.kill()
                handle.wait()
            self.loop.stop()

        finish()

    # ---- receiving ------------------------------------------------------

    def _on_client_message(self, frames: list[zmq.Frame]) -> None:
        self._receive(frames, self._handle_client, "a client")

    def _on_engine_message(self, frames: list[zmq.Frame]) -> None:
        self._receive(frames, self._handle_engine, "an engine")

    def _receive(
        self, frames: list[zmq.Frame], handle: Callable[[bytes, Message], None], peer: str
    ) -> None:
        unpacked = unpack_or_drop(self.session, frames, peer)
        if unpacked is None:
            return
        idents, messages = unpacked
        if len(idents) != 1:
            logger.warning("dropped a message from %s: %d routing ids", peer, len(idents))
            return
        for msg in messages:
            handle(idents[0], msg)

    # ---- sending --------------------------------------------------------

    def _reply(
        self,
        ident: bytes,
        msg_type: MsgType,
        content: dict[str, Any],
        parent: Message,
        to_engine: bool = False,
        on_unreachable: OnUnreachable = None,
        **kw: Any,
    ) -> None:
        envelope = self.session.envelope(msg_type, content, dict(parent.header), **kw)
        sock = self.engines if to_engine else self.clients
        self.outbox.put(sock, envelope, ident, on_unreachable)

    def _send_to_asker(
        self, record: TaskRecord, envelope: Envelope, on_unreachable: OnUnreachable = None
    ) -> None:
        """Send to whoever submitted the task: a client, or an engine."""
        sock = self.engines if record.is_from_engine else self.clients
        self.outbox.put(sock, envelope, record.client_ident, on_unreachable)

    def _send_engine(
        self, engine: EngineRecord, msg_type: MsgType, content: dict[str, Any]
    ) -> None:
        def unreachable() -> None:
            logger.warning("engine %d is unreachable", engine.engine_id)

        self.outbox.put(
            self.engines, self.session.envelope(msg_type, content), engine.ident, unreachable
        )

    # ---- clients --------------------------------------------------------

    def _handle_client(self, ident: bytes, msg: Message) -> None:
        handler = self._client_handlers.get(msg.msg_type)
        if handler is None:
            logger.warning("dropped a %s from a client: not a client request", msg.msg_type)
            return
        handler(self, ident, msg)

    def _on_connect(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, MsgType.CONNECT_REPLY, self._status(), msg)

    def _on_client_heartbeat(self, ident: bytes, msg: Message) -> None:
        """A client on another host beats every second: the answer tells it this controller lives."""
        self._reply(ident, MsgType.HEARTBEAT_REPLY, {}, msg)

    def _on_status(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, MsgType.STATUS_REPLY, self._status(), msg)

    def _status(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "engines": [e.describe() for e in self.registry.all()],
            "launch_failures": self.launch_failures,
            "tasks": {
                "pending": self.tasks.pending_count(),
                "queued": len(self.balanced),
                "done": self.tasks.count_done,
                "failed": self.tasks.count_failed,
            },
            "actors": [a.describe() for a in self.actors.all()],
            "idle_timeout_s": self.idle_timeout_s,
            "idle_stop_at": self._idle_stop_at(),
            "seq": self.state_seq,
        }

    def _idle_stop_at(self) -> float | None:
        """When (epoch seconds) the cluster stops if it stays idle; None while work is pending."""
        if self.idle_timeout_s is None or self.tasks.pending_count():
            return None
        left_s = self.last_busy + self.idle_timeout_s - time.monotonic()
        return round(time.time() + left_s)  # whole seconds: the same deadline publishes alike

    def _on_task(self, ident: bytes, msg: Message, from_engine: bool = False) -> None:
        self.last_busy = time.monotonic()
        content = msg.content
        target = content.get("target")
        record = TaskRecord(
            task_id=content["task_id"],
            client_ident=ident,
            kind=content.get("kind", ""),
            target=target,
            request=msg,
            allowed=tuple(content["allowed"]) if content.get("allowed") else None,
            is_from_engine=from_engine,
            is_ack_expected=content.get("acks") is True,
            segments=shm.segment_names(content.get("shm")),
            segment_receivers=content.get("shm_receivers", 1),
        )
        retries = content.get("retries")
        if target is None and isinstance(retries, int) and retries > 0:
            record.retries_left = retries
        if self.tasks.get(record.task_id) is not None:
            logger.warning("dropped a task_request reusing task id %s", record.task_id)
            return
        self.tasks.add(record)
        self._state_changed()
        if record.kind.startswith("actor_"):
            self._on_actor_request(record, msg)
            return
        if target is None:
            self.balanced.push(record)
            self.is_dispatch_due = True
            return
        engine = self.registry.by_id(target)
        if engine is None or engine.is_dead:
            self._fail(record, "NoEnginesError", f"engine {target} is not running", target)
            return
        self._dispatch(record, engine)

    def _on_result(self, ident: bytes, msg: Message, from_engine: bool = False) -> None:
        self.last_busy = time.monotonic()
        for task_id in msg.content["task_ids"]:
            record = self.tasks.get(task_id)
            if record is None:
                content = {"task_id": task_id, "status": "unknown"}
                self._reply(ident, MsgType.RESULT_REPLY, content, msg, to_engine=from_engine)
            elif not record.is_finished:
                record.waiters.append((from_engine, ident))  # answered when it finishes
                content = {"task_id": task_id, "status": "pending"}
                self._reply(ident, MsgType.RESULT_REPLY, content, msg, to_engine=from_engine)
            else:
                self._deliver(record, ident, msg, to_engine=from_engine)

    def _on_result_ack(self, ident: bytes, msg: Message) -> None:
        """The client has these results: they may leave the store in their turn."""
        task_ids = msg.content.get("task_ids")
        for task_id in task_ids if isinstance(task_ids, list) else []:
            record = self.tasks.get(task_id) if isinstance(task_id, str) else None
            if record is not None and record.is_finished:
                self.tasks.mark_collected(record)

    def _on_history(self, ident: bytes, msg: Message) -> None:
        limit = int(msg.content.get("limit", 100))
        self._reply(
            ident,
            MsgType.HISTORY_REPLY,
            {"tasks": [t.describe() for t in self.tasks.recent(limit)]},
            msg,
        )

    def _on_cancel(self, ident: bytes, msg: Message) -> None:
        """Drop queued tasks here; ask engines to give back those they have not started."""
        cancelled = []
        for task_id in msg.content["task_ids"]:
            record = self.tasks.get(task_id)
            if record is None or record.is_finished:
                continue
            if record.state == TaskState.QUEUED and self.balanced.remove(record):
                self.tasks.finish(record, TaskState.CANCELLED, None)
                cancelled.append(task_id)
                continue
            engine = self.registry.by_id(record.engine_id) if record.engine_id is not None else None
            if engine is not None and task_id in list(engine.in_flight)[1:]:
                self.cancelling.add(task_id)
                self._send_engine(engine, MsgType.STEAL_REQUEST, {"task_ids": [task_id]})
        self._state_changed()
        self._reply(ident, MsgType.CANCEL_REPLY, {"cancelled": cancelled}, msg)

    def _on_interrupt(self, ident: bytes, msg: Message) -> None:
        task_ids = msg.content.get("task_ids")
        engine_ids = msg.content.get("engine_ids")
        interrupted = []
        for engine in self.registry.live():
            if engine_ids is not None and engine.engine_id not in engine_ids:
                continue
            if task_ids is not None and not set(task_ids) & set(engine.in_flight):
                continue
            self._send_engine(engine, MsgType.INTERRUPT_REQUEST, {"task_ids": task_ids})
            interrupted.append(engine.engine_id)
        self._reply(ident, MsgType.INTERRUPT_REPLY, {"engine_ids": interrupted}, msg)

    def _on_restart(self, ident: bytes, msg: Message) -> None:
        """Replace engines in place: kill each (its work fails), start a new one with its id."""
        restarting: list[int] = []
        refused: dict[str, str] = {}
        for engine_id in msg.content["engine_ids"]:
            engine = self.registry.by_id(engine_id)
            if engine is None:
                refused[str(engine_id)] = f"there is no engine {engine_id}"
            elif engine.process is None or self.start_engine is None:
                refused[str(engine_id)] = (
                    f"engine {engine_id} was not started by this controller, so it cannot start it again"
                )
            else:
                if not engine.is_dead:
                    engine.process.kill()
                    self._on_engine_death(engine, engine.process.wait())
                self._launch_engine(engine_id)
                restarting.append(engine_id)
        self._reply(
            ident, MsgType.RESTART_REPLY, {"restarting": restarting, "refused": refused}, msg
        )

    def _on_shutdown(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, MsgType.SHUTDOWN_REPLY, {"status": "ok"}, msg)
        self.shutdown()

    _client_handlers: ClassVar[dict[str, Callable[[Controller, bytes, Message], None]]] = {
        MsgType.CONNECT_REQUEST: _on_connect,
        MsgType.HEARTBEAT_REQUEST: _on_client_heartbeat,
        MsgType.STATUS_REQUEST: _on_status,
        MsgType.TASK_REQUEST: _on_task,
        MsgType.RESULT_REQUEST: _on_result,
        MsgType.RESULT_ACK: _on_result_ack,
        MsgType.HISTORY_REQUEST: _on_history,
        MsgType.CANCEL_REQUEST: _on_cancel,
        MsgType.INTERRUPT_REQUEST: _on_interrupt,
        MsgType.RESTART_REQUEST: _on_restart,
        MsgType.SHUTDOWN_REQUEST: _on_shutdown,
    }

    # ---- scheduling -----------------------------------------------------

    def _dispatch(self, record: TaskRecord, engine: EngineRecord) -> None:
        request = record.request
        assert request is not None  # kept until the task is sent
        record.engine_id = engine.engine_id
        record.state = TaskState.RUNNING
        engine.in_flight.append(record.task_id)
        if record.times_sent == 0:
            envelope = request.envelope
        else:  # a new header, so a new signature: the engine that gave it back would drop a replay
            envelope = self.session.envelope(
                MsgType.TASK_REQUEST,
                request.content,
                request.parent,
                signed_buffers=request.envelope.signed,
                raw_buffers=request.envelope.raw,
            )
        record.times_sent += 1
        if record.target is not None:
            record.request = None
        self.outbox.put(
            self.engines, envelope, engine.ident, lambda: self._on_engine_death(engine, None)
        )

    def _dispatch_if_due(self) -> None:
        """Place balanced work once per turn of the loop, not once per message of a batch."""
        if self.is_dispatch_due:
            self.is_dispatch_due = False
            self._dispatch_balanced()

    def _dispatch_balanced(self) -> None:
        live = self.registry.live()
        for record, engine in self.balanced.assign(live):
            self._dispatch(record, engine)
        for engine_id, task_ids in self.balanced.plan_steals(
            live, self.tasks.get, self.stealing
        ).items():
            donor = self.registry.by_id(engine_id)
            if donor is not None:
                self.stealing.update(task_ids)
                self._send_engine(donor, MsgType.STEAL_REQUEST, {"task_ids": task_ids})

    def _on_steal_reply(self, engine: EngineRecord, msg: Message) -> None:
        """Take back the tasks the engine had not started: place them again, or end cancelled ones."""
        self.stealing.difference_update(msg.content["asked"])
        returned = []
        for task_id in msg.content["task_ids"]:
            record = self.tasks.get(task_id)
            if record is None or task_id not in engine.in_flight:
                continue
            engine.in_flight.remove(task_id)
            if task_id in self.cancelling:
                self.tasks.finish(record, TaskState.CANCELLED, None)
                continue
            record.state = TaskState.QUEUED
            record.engine_id = None
            returned.append(record)
        self.cancelling.difference_update(msg.content["asked"])
        self.balanced.push_front(returned)
        self._dispatch_balanced()

    # ---- actors ---------------------------------------------------------

    def _on_actor_request(self, record: TaskRecord, msg: Message) -> None:
        """Create, call or kill an actor. Calls go straight to the actor's engine, in arrival order."""
        content = msg.content
        actor_id = record.actor_id = content["actor_id"]
        if record.kind == "actor_create":
            self._create_actor(record, msg)
            return
        actor = self.actors.get(actor_id)
        if actor is None:
            if record.kind == "actor_kill":
                self._finish_here(record)  # killing a dead actor is done already
            else:
                self._fail(record, "ActorDiedError", self.actors.death_of(actor_id), None)
            return
        if record.kind == "actor_kill":
            death = f"actor {actor.label} was killed"
            self.actors.remove(actor, death)
            for task_id in list(actor.pending):
                self._fail_actor_call(actor, task_id, f"{death} before this call finished")
            self._state_changed()
        self._send_to_actor(record, actor, msg.envelope)

    def _create_actor(self, record: TaskRecord, msg: Message) -> None:
        content = msg.content
        name = content.get("name")
        if name and self.actors.by_name(name) is not None:
            evalue = f"an actor named {name!r} already exists in this cluster; get it with `c.get_actor({name!r})`"
            self._fail(record, "ValueError", evalue, None)
            return
        live = self.registry.live()
        if record.target is not None:
            live = [e for e in live if e.engine_id == record.target]
        engine = place(live, self.actors, record.allowed)
        if engine is None:
            wanted = (
                f"engine {record.target} is not running"
                if record.target is not None
                else "nowhere to place an actor"
            )
            self._fail(record, "NoEnginesError", wanted, record.target)
            return
        actor = ActorRecord(
            actor_id=content["actor_id"],
            class_name=content.get("class_name", "?"),
            name=name,
            methods=list(content.get("methods", [])),
            engine_id=engine.engine_id,
            create=msg,
            max_restarts=int(content.get("max_restarts", 0)),
        )
        self.actors.add(actor)
        self._state_changed()
        self._send_to_actor(record, actor, msg.envelope)

    def _send_to_actor(self, record: TaskRecord, actor: ActorRecord, envelope: Envelope) -> None:
        record.engine_id = actor.engine_id
        record.state = TaskState.RUNNING
        record.request = None
        actor.pending.add(record.task_id)
        engine = self.registry.by_id(actor.engine_id)

        def unreachable() -> None:
            reason = f"the engine of actor {actor.label} is unreachable"
            self._fail_actor_call(actor, record.task_id, reason)

        if engine is None:
            unreachable()
        else:
            self.outbox.put(self.engines, envelope, engine.ident, unreachable)

    def _on_actor_reply(self, record: TaskRecord, msg: Message) -> None:
        actor = self.actors.get(record.actor_id or "")
        if actor is not None and record.task_id in actor.pending:
            actor.pending.discard(record.task_id)
            if record.kind == "actor_create" and msg.content.get("status") != "ok":
                error = msg.content.get("error", {})
                death = f"the constructor of actor {actor.label} raised {error.get('ename')}: {error.get('evalue')}"
                self.actors.remove(actor, death)
                for task_id in list(actor.pending):
                    self._fail_actor_call(actor, task_id, death)
            elif record.kind == "actor_call":
                actor.calls_done += 1
            self._state_changed()
        if not record.is_finished:
            self._finish(record, msg)

    def _fail_actor_call(self, actor: ActorRecord, task_id: str, reason: str) -> None:
        actor.pending.discard(task_id)
        record = self.tasks.get(task_id)
        if record is not None and not record.is_finished:
            self._fail(record, "ActorDiedError", reason, actor.engine_id)

    def _finish_here(self, record: TaskRecord) -> None:
        content = {"task_id": record.task_id, "engine_id": None, "status": "ok"}
        _, reply = self.session.unpack(self.session.pack(MsgType.TASK_REPLY, content))
        self._finish(record, reply)

    def _on_actors_engine_death(self, engine: EngineRecord) -> None:
        """Fail the calls of the dead engine's actors; make again those allowed to restart."""
        for actor in self.actors.on_engine(engine.engine_id):
            target = (
                place(self.registry.live(), self.actors, None)
                if actor.restarts < actor.max_restarts
                else None
            )
            if target is None:
                death = (
                    f"actor {actor.label} lived on engine {engine.engine_id}, which died; "
                    f"create it again with `c.actor(...)`"
                )
                self.actors.remove(actor, death)
                for task_id in list(actor.pending):
                    self._fail_actor_call(actor, task_id, death)
                continue
            reason = (
                f"actor {actor.label} lost engine {engine.engine_id}, which died, and was made again on "
                f"engine {target.engine_id}: its state starts afresh and this call was lost"
            )
            for task_id in list(actor.pending):
                self._fail_actor_call(actor, task_id, reason)
            actor.restarts += 1
            actor.engine_id = target.engine_id
            actor.state = None
            content = {**actor.create.content, "task_id": new_id()}
            create = self.session.envelope(
                MsgType.TASK_REQUEST,
                content,
                signed_buffers=actor.create.envelope.signed,
                raw_buffers=actor.create.envelope.raw,
            )
            record = TaskRecord(content["task_id"], b"", "actor_create", target.engine_id, None)
            record.actor_id = actor.actor_id
            self.tasks.add(record)
            logger.info("actor %s restarts on engine %d", actor.label, target.engine_id)
            self._send_to_actor(record, actor, create)

    # ---- engines --------------------------------------------------------

    def _handle_engine(self, ident: bytes, msg: Message) -> None:
        if msg.msg_type == MsgType.REGISTER_REQUEST:
            self._on_register(ident, msg)
            return
        engine = self.registry.by_ident(ident)
        if engine is None:
            logger.warning(
                "dropped a %s from an unregistered or dead engine; telling it to stop", msg.msg_type
            )
            self.outbox.put(
                self.engines, self.session.envelope(MsgType.SHUTDOWN_REQUEST, {}), ident
            )
            return
        engine.last_seen = time.monotonic()
        if msg.msg_type == MsgType.TASK_REPLY:
            self._on_task_reply(engine, msg)
        elif msg.msg_type == MsgType.TASK_REQUEST:
            self._on_task(ident, msg, from_engine=True)
        elif msg.msg_type == MsgType.RESULT_REQUEST:
            self._on_result(ident, msg, from_engine=True)
        elif msg.msg_type == MsgType.ACTOR_STATE:
            actor = self.actors.get(msg.content.get("actor_id", ""))
            if actor is not None and actor.engine_id == engine.engine_id:
                actor.state = msg.content.get("state")
                self._state_changed()
        elif msg.msg_type in (MsgType.STREAM, MsgType.DISPLAY_DATA, MsgType.EXECUTE_RESULT):
            self._forward_output(msg)
        elif msg.msg_type == MsgType.STEAL_REPLY:
            self._on_steal_reply(engine, msg)
        elif msg.msg_type == MsgType.MEMORY_EXCEEDED:
            self._on_memory_exceeded(engine, msg)
        elif msg.msg_type == MsgType.HEARTBEAT_REQUEST:
            metrics = msg.content.get("metrics", {})
            if metrics != engine.metrics:
                engine.metrics = metrics
                self._state_changed()
            engine.heartbeats += 1
            if engine.heartbeats % HEARTBEATS_PER_REPLY == 0:
                self._send_engine(engine, MsgType.HEARTBEAT_REPLY, {})
        elif msg.msg_type != MsgType.SHUTDOWN_REPLY:
            logger.warning(
                "dropped a %s from engine %d: not an engine message", msg.msg_type, engine.engine_id
            )

    def _on_register(self, ident: bytes, msg: Message) -> None:
        content = msg.content
        pid = int(content.get("pid", 0))
        handle = self.launching.pop(pid, None)
        engine = self.registry.register(
            ident, pid, str(content.get("host", "")), content.get("requested_id"), handle
        )
        logger.info("engine %d registered (pid %d on %s)", engine.engine_id, pid, engine.host)
        engine.memory_limit_bytes = self.memory_limit_bytes
        self._send_engine(
            engine,
            MsgType.REGISTER_REPLY,
            {
                "status": "ok",
                "engine_id": engine.engine_id,
                "n_engines": len(self.registry.live()),
                "memory_limit_bytes": self.memory_limit_bytes,
            },
        )
        self.have_engines_changed = True
        self._state_changed()
        self._dispatch_balanced()

    def _tell_engines_if_changed(self) -> None:
        """Give every engine the cluster's new size (``engine_context().n_engines``).

        Once a turn, after its registrations and deaths: sent before any work
        that arrives later, so code on an engine never sees a stale size.
        """
        if not self.have_engines_changed:
            return
        self.have_engines_changed = False
        live = self.registry.live()
        for engine in live:
            self._send_engine(engine, MsgType.ENGINES_CHANGED, {"n_engines": len(live)})

    def _on_task_reply(self, engine: EngineRecord, msg: Message) -> None:
        task_id = msg.content.get("task_id", "")
        record = self.tasks.get(task_id)
        if record is not None and record.actor_id is not None:
            self._on_actor_reply(record, msg)
            return
        try:
            engine.in_flight.remove(task_id)
        except ValueError:
            logger.warning(
                "engine %d replied to task %s it was not running", engine.engine_id, task_id
            )
            return
        if record is not None:
            self._finish(record, msg)
        self._state_changed()
        self.is_dispatch_due = True

    def _finish(self, record: TaskRecord, reply: Message) -> None:
        """Keep a task's reply and pass it on, verbatim, to its asker and any waiters."""
        failed = reply.content.get("status") != "ok"
        self.tasks.finish(record, TaskState.FAILED if failed else TaskState.DONE, reply)
        self.tasks.mark_delivered(record)
        self._send_to_asker(record, reply.envelope, lambda: self.tasks.mark_undelivered(record))
        for is_engine, ident in record.waiters:
            self._deliver(record, ident, reply, to_engine=is_engine)
        record.waiters.clear()

    def _forward_output(self, msg: Message) -> None:
        record = self.tasks.get(msg.content.get("task_id", ""))
        if record is not None:
            self._send_to_asker(record, msg.envelope)

    def _deliver(
        self, record: TaskRecord, ident: bytes, request: Message, to_engine: bool = False
    ) -> None:
        """Send a finished task's stored reply, as a ``result_reply`` to ``request``."""
        reply = record.reply
        if reply is None:
            content = {"task_id": record.task_id, "status": str(record.state)}
            self._reply(ident, MsgType.RESULT_REPLY, content, request, to_engine=to_engine)
            return
        self.tasks.mark_delivered(record)
        self._reply(
            ident,
            MsgType.RESULT_REPLY,
            reply.content,
            request,
            to_engine=to_engine,
            on_unreachable=lambda: self.tasks.mark_undelivered(record),
            signed_buffers=reply.envelope.signed,
            raw_buffers=reply.envelope.raw,
        )

    def _fail(
        self, record: TaskRecord, ename: str, evalue: str, engine_id: int | None, **extra: Any
    ) -> None:
        """Finish a task with an error made here (not by user code) and tell its client."""
        content = {
            "task_id": record.task_id,
            "engine_id": engine_id,
            "status": "error",
            "error": {"ename": ename, "evalue": evalue, "traceback": "", **extra},
        }
        reply_frames = self.session.pack(MsgType.TASK_REPLY, content)
        _, reply = self.session.unpack(reply_frames)  # stored and sent like an engine's reply
        self._finish(record, reply)

    def _check_engines(self) -> None:
        now = time.monotonic()
        self._check_exits()
        if self.shm_pool is not None:
            self.shm_pool.remove_dead_owners()  # a killed client's
        finished = self.tasks.count_done + self.tasks.count_failed
        if finished != self.finished_at_release and not self.tasks.pending_count():
            self.finished_at_release = finished  # the work drained: give back what it took
            memory.release_free_memory()
        # A controller that was itself stopped (SIGSTOP, a suspended laptop) heard nobody
        # meanwhile: that silence is its own, not the engines'.
        paused_s = now - self.last_check - CHECK_INTERVAL_S
        self.last_check = now
        for engine in self.registry.live():
            if paused_s > CHECK_INTERVAL_S:
                engine.last_seen += paused_s
            silent_s = now - engine.last_seen
            is_working = silent_s > CPU_READ_AFTER_S and self._has_used_cpu(engine)
            if silent_s > HEARTBEAT_TIMEOUT_S and not is_working:
                self._on_engine_death(engine, None)
        if self.tasks.pending_count():
            self.last_busy = now
        elif self.idle_timeout_s is not None and now - self.last_busy > self.idle_timeout_s:
            logger.warning(
                "no work and no client request for %.0f s (the idle timeout); the cluster stops",
                self.idle_timeout_s,
            )
            self.shutdown()
            return
        if self.registry.live() or self.launching:
            self.last_engine_seen = max(self.last_engine_seen, now)
        elif now - self.last_engine_seen > self.orphan_timeout_s:
            logger.error("no engines for %.0f s; the cluster stops", self.orphan_timeout_s)
            self.shutdown()
            return
        self.loop.call_later(CHECK_INTERVAL_S, self._check_engines)

    @staticmethod
    def _has_used_cpu(engine: EngineRecord) -> bool:
        """Whether a silent engine of this host used CPU since the last check: it is busy, not dead.

        Code holding the GIL in C (a large import such as torch's on a loaded
        machine, a long regex or big-number computation) starves the engine's
        I/O thread of its heartbeats for seconds; a stopped or deadlocked
        process uses no CPU, and is stopped as before.
        """
        if engine.process is None:
            return False
        try:
            times = psutil.Process(engine.pid).cpu_times()
        except psutil.Error:
            return False
        was, engine.cpu_s = engine.cpu_s, times.user + times.system
        return was is not None and engine.cpu_s > was

    def _check_exits(self) -> None:
        """Engines whose process ended are dead; started ones that ended unregistered failed."""
        if self.is_shutting_down:
            return
        for engine in self.registry.live():
            exit_code = engine.process.poll() if engine.process is not None else None
            if exit_code is not None:
                self._on_engine_death(engine, exit_code)
        for pid, handle in list(self.launching.items()):
            exit_code = handle.poll()
            if exit_code is not None:
                del self.launching[pid]
                logger.error("engine pid %d exited with %s before registering", pid, exit_code)
                self.launch_failures.append(
                    {"pid": pid, "exit_code": exit_code, "log": getattr(handle, "log_path", "")}
                )
                self._state_changed()

    def _on_engine_death(self, engine: EngineRecord, exit_code: int | None) -> None:
        """Fail the task the engine was running; give its unstarted balanced tasks to others."""
        if engine.is_dead:
            return
        if exit_code is None and engine.process is not None:
            exit_code = engine.process.poll()
        if exit_code is None and engine.process is not None:
            engine.process.kill()  # silent but alive (stopped, or stuck holding the GIL): end it
            exit_code = engine.process.wait()
        self.registry.mark_dead(engine, exit_code)
        self.have_engines_changed = True
        logger.error(
            "engine %d (pid %d) died, exit code %s", engine.engine_id, engine.pid, exit_code
        )
        self._state_changed()
        in_flight = list(engine.in_flight)
        engine.in_flight.clear()
        last_started = None
        if exit_code is not None and engine.host == socket.gethostname():
            last_started = start_record.take_last_started(self.cluster_id, engine.pid)
        n_started = start_record.count_started(in_flight, last_started)
        requeue: list[TaskRecord] = []
        # A task that took its engine over the memory limit would take the next one too.
        may_retry = "memory_limit_bytes" not in engine.death_details
        for position, task_id in enumerate(in_flight):
            record = self.tasks.get(task_id)
            if record is None:
                continue
            has_started = position < n_started
            if has_started:
                record.died_on.append(engine.engine_id)
            # Never started: move it. Started: it runs again only if it may be retried.
            if record.target is None and (
                not has_started or (may_retry and record.retries_left > 0)
            ):
                if has_started:
                    record.retries_left -= 1
                    logger.info("task %s runs again: its engine died", task_id)
                requeue.append(record)
                continue
            self._fail(
                record,
                "EngineDiedError",
                f"engine {engine.engine_id} died",
                engine.engine_id,
                pid=engine.pid,
                host=engine.host,
                exit_code=exit_code,
                was_running=position == n_started - 1,
                died_on=record.died_on,
                **engine.death_details,
            )
        for record in requeue:
            record.state = TaskState.QUEUED
            record.engine_id = None
        self.balanced.push_front(requeue)
        self._on_actors_engine_death(engine)
        self._dispatch_balanced()

    def _on_memory_exceeded(self, engine: EngineRecord, msg: Message) -> None:
        """Stop an engine over its memory limit, failing its work with why; start a fresh one in its place.

        The engine watches its own memory (closely, and also on hosts this
        controller cannot see) and reports; the death is recorded here, as any other.
        """
        limit = self.memory_limit_bytes
        rss_bytes = msg.content.get("rss_bytes")
        if limit is None or not isinstance(rss_bytes, int) or rss_bytes <= limit:
            logger.warning(
                "dropped a memory report of engine %d: not over a limit", engine.engine_id
            )
            return
        can_restart = engine.process is not None and self.start_engine is not None
        logger.error(
            "engine %d used %d bytes, over its limit of %d; stopping it%s",
            engine.engine_id,
            rss_bytes,
            limit,
            " and starting a fresh one" if can_restart else "",
        )
        engine.death_details = {
            "rss_bytes": rss_bytes,
            "memory_limit_bytes": limit,
            "is_restarting": can_restart,
        }
        if engine.process is None:  # not started here, so not killed from here: it ends itself
            self._send_engine(engine, MsgType.SHUTDOWN_REQUEST, {})
        self._on_engine_death(engine, None)  # kills the process when this controller started it
        if can_restart:
            self._launch_engine(engine.engine_id)

    # ---- state for monitors ---------------------------------------------

    def _state_changed(self) -> None:
        """Publish the state soon; an idle cluster publishes nothing and wakes no one."""
        if not self.is_publish_due:
            self.is_publish_due = True
            self.loop.call_later(PUBLISH_DELAY_S, self._publish_state)

    def _publish_state(self) -> None:
        """Publish the state if it differs from the last publication."""
        self.is_publish_due = False
        state = self._status()
        state.pop("seq")
        if state != self.published_state:
            self.published_state = state
            self.state_seq += 1
            self.pub.send_multipart(
                self.session.pack(MsgType.STATE, {**state, "seq": self.state_seq})
            )
