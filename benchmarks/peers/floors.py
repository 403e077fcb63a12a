"""The floors of this machine: what pyzmq, a plain socket and memcpy allow, with no framework.

* A minimal Python broker (a ROUTER for clients, a DEALER to one echo
  worker, a poll loop forwarding both ways) in a process of its own, and an
  echo worker in another: the client -> controller -> engine path with
  nothing but ``recv_multipart``/``send_multipart``. Round trip and
  pipelined messages per second.
* jupyter-dist's own parts with no controller between them: a client
  whose I/O thread sends and receives for the calling thread, and an engine
  whose I/O thread hands each task to its main thread, both speaking the
  signed wire protocol, running ``apply(noop)``. What the direct round trip
  could take if nothing but these parts were on its path.
* One large message over TCP loopback with pyzmq ``copy=False``, and the
  same bytes over a plain TCP socket; memcpy of the same size.
* (``torch``) ``import torch`` in N fresh interpreters started together:
  from the first launch until the last has imported (each prints its
  ``time.monotonic()``). What N processes that use torch cannot start under.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from benchmarks.figures import Sizes
from benchmarks.measure import Samples, mb_per_s, peer_main, record, timed_ms
from jupyter_dist.ioloop import IOLoop
from jupyter_dist.outbox import Outbox
from jupyter_dist.protocol import Message, MsgType, Session, unpack_or_drop
from jupyter_dist.serialize import deserialize, serialize


def _broker(client_url: Any, worker_url: Any) -> None:
    ctx = zmq.Context()
    front = _unbounded(ctx.socket(zmq.ROUTER))
    back = _unbounded(ctx.socket(zmq.DEALER))
    client_url.put(f"tcp://127.0.0.1:{front.bind_to_random_port('tcp://127.0.0.1')}")
    worker_url.put(f"tcp://127.0.0.1:{back.bind_to_random_port('tcp://127.0.0.1')}")
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if frames[-1].bytes == b"stop":
                    return
                (back if sock is front else front).send_multipart(frames, copy=False)


def _unbounded(sock: zmq.Socket) -> zmq.Socket:
    """No high-water mark, as in the controller: a ROUTER drops what a full pipe cannot take,
    and one dropped message of a pipelined burst would leave the client waiting forever."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def _echo_worker(url: str) -> None:
    ctx = zmq.Context()
    sock = _unbounded(ctx.socket(zmq.DEALER))
    sock.connect(url)
    while True:
        frames = sock.recv_multipart(copy=False)
        sock.send_multipart(frames, copy=False)


def broker_floor(sizes: Sizes, samples: Samples) -> None:
    mp = multiprocessing.get_context("spawn")
    client_url, worker_url = mp.Queue(), mp.Queue()
    broker = mp.Process(target=_broker, args=(client_url, worker_url), daemon=True)
    broker.start()
    front, back = client_url.get(timeout=30), worker_url.get(timeout=30)
    worker = mp.Process(target=_echo_worker, args=(back,), daemon=True)
    worker.start()
    ctx = zmq.Context()
    sock = _unbounded(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.RCVTIMEO, 30_000)  # a lost message fails the floor, never hangs the run
    sock.connect(front)
    payload = [b"header" * 20, b"x" * 200]

    def roundtrip() -> None:
        sock.send_multipart(payload)
        sock.recv_multipart()

    record(samples, "floor_broker_roundtrip", timed_ms(roundtrip, sizes.roundtrip_reps, 20))
    n = sizes.pipelined_msgs
    for _ in range(3):
        window = 1000
        start = time.perf_counter()
        sent = received = 0
        while received < n:
            while sent < n and sent - received < window:
                sock.send_multipart(payload)
                sent += 1
            sock.recv_multipart()
            received += 1
        record(samples, "floor_broker_pipelined", n / (time.perf_counter() - start))
    sock.send_multipart([b"stop"])
    broker.join(10)
    worker.kill()
    sock.close(linger=0)
    ctx.term()


def _noop() -> None:
    return None


class _Peer:
    """One end of the parts floor: a session and an I/O thread's loop that owns ``sock``."""

    def __init__(self, key: bytes, sock: zmq.Socket) -> None:
        self.session = Session(key)
        self.sock = sock
        self.loop = IOLoop()
        self.outbox = Outbox(self.session)
        self.loop.at_turn_end(self.outbox.flush)

    def serve(self, on_message: Callable[[list[bytes], Message], None]) -> None:
        def receive(frames: list[zmq.Frame]) -> None:
            unpacked = unpack_or_drop(self.session, frames, "the floor's peer")
            if unpacked is not None:
                idents, messages = unpacked
                for msg in messages:
                    on_message(idents, msg)

        self.loop.add_socket(self.sock, receive)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.stop()
        self.thread.join(10)
        self.sock.close(linger=0)
        self.loop.close()

    def send(
        self, msg_type: MsgType, content: dict[str, Any], pickled: bytes, ident: bytes
    ) -> None:
        """Send from any thread, through the I/O thread."""
        envelope = self.session.envelope(msg_type, content, signed_buffers=[pickled])
        self.loop.call_soon_threadsafe(lambda: self.outbox.put(self.sock, envelope, ident))


def _parts_engine(key: bytes, url: Any) -> None:
    sock = _unbounded(zmq.Context().socket(zmq.ROUTER))
    url.put(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
    engine = _Peer(key, sock)
    tasks: queue.SimpleQueue[tuple[bytes, Message]] = queue.SimpleQueue()
    engine.serve(lambda idents, msg: tasks.put((idents[0], msg)))
    while True:  # the main thread runs tasks, as an engine's does
        ident, msg = tasks.get()
        fn, args, kwargs = deserialize(msg.signed_buffers[0], msg.raw_buffers, "a task")
        pickled, _ = serialize(fn(*args, **kwargs), "a result")
        reply = {"task_id": msg.content["task_id"], "status": "ok"}
        engine.send(MsgType.TASK_REPLY, reply, pickled, ident)


def parts_floor(sizes: Sizes, samples: Samples) -> None:
    key = os.urandom(32)
    mp = multiprocessing.get_context("spawn")
    url = mp.Queue()
    engine = mp.Process(target=_parts_engine, args=(key, url), daemon=True)
    engine.start()
    sock = _unbounded(zmq.Context().socket(zmq.DEALER))
    sock.connect(url.get(timeout=30))
    client = _Peer(key, sock)
    pending: dict[str, concurrent.futures.Future[Any]] = {}

    def resolve(idents: list[bytes], msg: Message) -> None:
        pending.pop(msg.content["task_id"]).set_result(
            deserialize(msg.signed_buffers[0], msg.raw_buffers, "a result")
        )

    client.serve(resolve)
    calls = itertools.count()

    def roundtrip() -> None:
        task_id = str(next(calls))
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        pending[task_id] = future
        pickled, _ = serialize((_noop, (), {}), "a task")
        client.send(MsgType.TASK_REQUEST, {"task_id": task_id, "kind": "apply"}, pickled, b"")
        future.result(30)

    record(samples, "floor_parts_roundtrip", timed_ms(roundtrip, sizes.roundtrip_reps, 20))
    engine.kill()
    client.close()


def zmq_send_floor(sizes: Sizes, samples: Samples) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    url = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    push = ctx.socket(zmq.PUSH)
    push.connect(url)
    blob = np.ones(sizes.nbytes, dtype=np.uint8)

    def once() -> None:
        push.send(blob, copy=False)
        frame = pull.recv(copy=False)
        assert len(frame) == sizes.nbytes

    record(samples, "floor_zmq_send", mb_per_s(once, sizes.nbytes, sizes.transfer_reps))
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()


def tcp_send_floor(sizes: Sizes, samples: Samples) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    blob = np.ones(sizes.nbytes, dtype=np.uint8)
    sink = np.empty(sizes.nbytes, dtype=np.uint8)
    sender = socket.create_connection(("127.0.0.1", port))
    receiver, _ = listener.accept()

    def once() -> None:
        thread = threading.Thread(target=sender.sendall, args=(memoryview(blob),))
        thread.start()
        view = memoryview(sink)
        got = 0
        while got < sizes.nbytes:
            got += receiver.recv_into(view[got:])
        thread.join()

    record(samples, "floor_tcp_send", mb_per_s(once, sizes.nbytes, sizes.transfer_reps))
    for s in (sender, receiver, listener):
        s.close()


def memcpy_floor(sizes: Sizes, samples: Samples) -> None:
    src = np.ones(sizes.nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = 0  # touch the pages once: this is the copy itself, not page faults
    record(
        samples,
        "floor_memcpy",
        mb_per_s(lambda: np.copyto(dst, src), sizes.nbytes, sizes.transfer_reps),
    )


def torch_import_floor(sizes: Sizes, samples: Samples) -> None:
    n = sizes.engines_large
    timed = "import time, torch; print(time.monotonic())"
    for _ in range(sizes.torch_start_reps):
        begin = time.monotonic()
        procs = [
            subprocess.Popen([sys.executable, "-c", timed], stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        imported = [float(p.communicate(timeout=300)[0]) for p in procs]
        record(samples, "floor_torch_import", max(imported) - begin)


def run(sizes: Sizes, samples: Samples) -> None:
    broker_floor(sizes, samples)
    parts_floor(sizes, samples)
    zmq_send_floor(sizes, samples)
    tcp_send_floor(sizes, samples)
    memcpy_floor(sizes, samples)


if __name__ == "__main__":
    raise SystemExit(peer_main({"core": run, "torch": torch_import_floor}))
