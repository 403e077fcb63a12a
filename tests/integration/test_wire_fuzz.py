"""Every listening socket takes floods of bad messages: nothing runs, nothing dies, all still answers.

Each test feeds one socket kind ``wire_fuzz.TARGET_MESSAGES`` generated
messages (``make fuzz``: 100,000), syncing with a real request after each
batch so queues stay bounded, then checks: the load-marker file never
appeared, the process is alive and its RSS grew less than a bound, and a
real round trip still works. Counts are printed (``make fuzz`` shows them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
import zmq.asyncio

import jupyter_dist as jd
from jupyter_dist import connection_file, start_record
from jupyter_dist.connection_file import ClusterInfo
from jupyter_dist.private_file import write_atomically
from jupyter_dist.protocol import Buffer, MsgType, Session, new_id
from jupyter_dist.serialize import deserialize
from jupyter_dist.server.clusters import ClusterLink
from tests.waiting import poll_for
from tests.wire_fuzz import Generator, fuzz

MiB = 1024 * 1024
RSS_GROWTH_BOUND = 64 * MiB  # a process's RSS after a flood, over its RSS after the first batch
SYNC_TIMEOUT_S = 60.0

_NOBLOCK = int(zmq.NOBLOCK)
EngineUnderTest = tuple[zmq.Socket[Any], Session, bytes, bytes, subprocess.Popen[bytes]]


def report(kind: str, sent: int, started: float, rss_before: int, rss_after: int) -> None:
    seconds = time.monotonic() - started
    print(
        f"\nfuzz: {kind}: {sent:,} messages in {seconds:.1f} s "
        f"({sent / seconds:,.0f}/s), RSS {rss_before / MiB:.0f} -> {rss_after / MiB:.0f} MiB"
    )


@pytest.fixture
def sockets() -> Iterator[Callable[[int], zmq.Socket[Any]]]:
    """pyzmq-style socket factory: every socket closes with linger=0."""
    ctx = zmq.Context()
    made: list[zmq.Socket[Any]] = []

    def make(kind: int) -> zmq.Socket[Any]:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop: each batch ends with a sync instead
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close(linger=0)
    ctx.term()


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / f"loaded-{secrets.token_hex(4)}"
    yield path
    assert not path.exists(), "a process unpickled a message it should have dropped"


def send_all(sock: zmq.Socket[Any], batch: list[list[Buffer]], prefix: list[bytes]) -> None:
    for frames in batch:
        sock.send_multipart([*prefix, *frames], _NOBLOCK, copy=False)


def receive_until(
    sock: zmq.Socket[Any], session: Session, wanted: Callable[[Any], bool], what: str
) -> Any:
    """Read ``sock`` until a message satisfies ``wanted``; fail after SYNC_TIMEOUT_S."""
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        _, msg = session.unpack(sock.recv_multipart(copy=False))
        for each in session.split(msg):
            if wanted(each):
                return each
    pytest.fail(f"{what}: no answer within {SYNC_TIMEOUT_S} s")


def controller_process(c: jd.Cluster) -> psutil.Process:
    return psutil.Process(connection_file.read(c.connection_file).controller_pid)


# ---- the controller's two ROUTER ports ---------------------------------------


def fuzz_controller_port(
    c: jd.Cluster,
    sockets: Callable[[int], zmq.Socket[Any]],
    marker: Path,
    port_name: str,
    types: tuple[MsgType, ...],
    sync: Callable[[zmq.Socket[Any], Session], None],
    kind: str,
) -> None:
    info = connection_file.read(c.connection_file)
    session = Session(bytes.fromhex(info.key))
    sock = sockets(zmq.DEALER)
    sock.connect(info.url(getattr(info, port_name)))
    controller = controller_process(c)
    generator = Generator(bytes.fromhex(info.key), marker)
    rss: list[int] = []
    started = time.monotonic()

    def send_batch(batch: list[list[Buffer]]) -> None:
        send_all(sock, batch, [])
        sync(sock, session)
        rss.append(controller.memory_info().rss)

    sent = fuzz(generator, types, send_batch)

    assert controller.is_running()
    assert rss[-1] - rss[0] < RSS_GROWTH_BOUND
    assert c.run("6 * 7") == [42, 42]
    assert c.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    report(kind, sent, started, rss[0], rss[-1])


def sync_with_status(sock: zmq.Socket[Any], session: Session) -> None:
    msg_id = new_id()
    sock.send_multipart(session.pack(MsgType.STATUS_REQUEST, {}, msg_id=msg_id))
    receive_until(
        sock, session, lambda m: m.parent.get("msg_id") == msg_id, "controller client port"
    )


def sync_with_heartbeat(sock: zmq.Socket[Any], session: Session) -> None:
    # An unregistered engine's heartbeat is answered with a shutdown_request.
    sock.send_multipart(session.pack(MsgType.HEARTBEAT_REQUEST, {"engine_id": 0, "metrics": {}}))
    receive_until(
        sock, session, lambda m: m.msg_type == MsgType.SHUTDOWN_REQUEST, "controller engine port"
    )


def test_controller_client_port_survives_a_flood_of_bad_messages(
    fresh_cluster: jd.Cluster, sockets: Callable[[int], zmq.Socket[Any]], marker: Path
) -> None:
    types = (
        MsgType.TASK_REQUEST,
        MsgType.RESULT_REQUEST,
        MsgType.CANCEL_REQUEST,
        MsgType.INTERRUPT_REQUEST,
        MsgType.HISTORY_REQUEST,
        MsgType.RESTART_REQUEST,
        MsgType.STEAL_REPLY,
    )
    fuzz_controller_port(
        fresh_cluster,
        sockets,
        marker,
        "client_port",
        types,
        sync_with_status,
        "controller client port (ROUTER)",
    )


def test_controller_engine_port_survives_a_flood_of_bad_messages(
    fresh_cluster: jd.Cluster, sockets: Callable[[int], zmq.Socket[Any]], marker: Path
) -> None:
    types = (
        MsgType.REGISTER_REQUEST,
        MsgType.HEARTBEAT_REQUEST,
        MsgType.TASK_REPLY,
        MsgType.TASK_REQUEST,
        MsgType.RESULT_REQUEST,
        MsgType.ACTOR_STATE,
        MsgType.STREAM,
        MsgType.DISPLAY_DATA,
        MsgType.STEAL_REPLY,
    )
    fuzz_controller_port(
        fresh_cluster,
        sockets,
        marker,
        "engine_port",
        types,
        sync_with_heartbeat,
        "controller engine port (ROUTER)",
    )


# ---- an engine's DEALER, with this test as its controller --------------------


@pytest.fixture
def engine_under_test(
    runtime_dir: Path, tmp_path: Path, sockets: Callable[[int], zmq.Socket[Any]]
) -> Iterator[EngineUnderTest]:
    """A real engine registered with a ROUTER bound here: (router, session, key, ident, process)."""
    router = sockets(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("tcp://127.0.0.1:*")
    port = int(router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    key = os.urandom(32)
    info = ClusterInfo(
        cluster_id=f"fuzz{secrets.token_hex(4)}",
        key=key.hex(),
        ip="127.0.0.1",
        client_port=port,
        engine_port=port,
        pub_port=port,
        controller_pid=os.getpid(),
        host=socket.gethostname(),
        created=time.time(),
    )
    # Outside the runtime dir: there, any watcher (a Jupyter server's panel) would take it
    # for a running cluster and send this ROUTER requests of its own.
    path = tmp_path / "engine-connection.json"
    write_atomically(path, json.dumps(dataclasses.asdict(info)))
    log = (tmp_path / "engine.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter_dist.cli", "engine", "--connection-file", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    session = Session(key)
    try:
        assert router.poll(30_000), "the engine did not register"
        frames = router.recv_multipart(copy=False)
        ident = frames[0].bytes
        _, register = session.unpack(frames)
        assert register.msg_type == MsgType.REGISTER_REQUEST
        router.send_multipart(
            [
                ident,
                *session.pack(
                    MsgType.REGISTER_REPLY,
                    {"status": "ok", "engine_id": 0},
                    parent=dict(register.header),
                ),
            ]
        )
        yield router, session, key, ident, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        start_record.take_last_started(info.cluster_id, process.pid)  # as a controller does
        log.close()
        path.unlink(missing_ok=True)
        if process.returncode not in (0, -9):
            print((tmp_path / "engine.log").read_text(errors="replace")[-5000:])


def test_engine_survives_a_flood_of_bad_messages_from_its_controller(
    engine_under_test: EngineUnderTest,
    marker: Path,
) -> None:
    router, session, key, ident, process = engine_under_test
    engine = psutil.Process(process.pid)
    generator = Generator(key, marker)
    types = (
        MsgType.TASK_REQUEST,
        MsgType.TASK_REPLY,
        MsgType.RESULT_REPLY,
        MsgType.STREAM,
        MsgType.REGISTER_REPLY,
        MsgType.STEAL_REQUEST,
        MsgType.INTERRUPT_REQUEST,
        MsgType.HEARTBEAT_REQUEST,
    )
    rss: list[int] = []
    started = time.monotonic()

    def send_batch(batch: list[list[Buffer]]) -> None:
        send_all(router, batch, [ident])
        asked = [new_id()]
        router.send_multipart([ident, *session.pack(MsgType.STEAL_REQUEST, {"task_ids": asked})])
        receive_until(
            router,
            session,
            lambda m: m.msg_type == MsgType.STEAL_REPLY and m.content["asked"] == asked,
            "engine",
        )
        rss.append(engine.memory_info().rss)

    sent = fuzz(generator, types, send_batch)

    assert process.poll() is None
    assert rss[-1] - rss[0] < RSS_GROWTH_BOUND
    task_id = new_id()
    router.send_multipart(
        [
            ident,
            *session.pack(
                MsgType.TASK_REQUEST,
                {"task_id": task_id, "kind": "execute", "code": "6 * 7", "target": 0},
            ),
        ]
    )
    reply = receive_until(
        router,
        session,
        lambda m: m.msg_type == MsgType.TASK_REPLY and m.content["task_id"] == task_id,
        "engine task",
    )
    assert reply.content["status"] == "ok"
    assert deserialize(reply.signed_buffers[0], reply.raw_buffers, "the reply") == 42
    router.send_multipart([ident, *session.pack(MsgType.SHUTDOWN_REQUEST, {})])
    poll_for(lambda: process.poll() is not None, 20, "the engine's exit after shutdown")
    assert process.returncode == 0
    report("engine DEALER", sent, started, rss[0], rss[-1])


def test_engine_answers_a_task_whose_payload_is_not_a_call_with_an_error(
    engine_under_test: EngineUnderTest,
) -> None:
    # Found by the fuzz: a signed apply whose pickle was not (fn, args, kwargs) ended the engine.
    router, session, _, ident, process = engine_under_test
    task_id = new_id()
    frames = session.pack(
        MsgType.TASK_REQUEST,
        {"task_id": task_id, "kind": "apply", "target": 0},
        signed_buffers=[pickle.dumps("not a call")],
    )
    router.send_multipart([ident, *frames])

    reply = receive_until(
        router,
        session,
        lambda m: m.msg_type == MsgType.TASK_REPLY and m.content["task_id"] == task_id,
        "engine task",
    )
    assert reply.content["status"] == "error"
    assert reply.content["error"]["ename"] == "ValueError"
    assert process.poll() is None


# ---- the state publisher's subscribers -------------------------------------------


def state_like(c: jd.Cluster, seq: int) -> dict[str, Any]:
    """A state as the controller publishes it, numbered ``seq``."""
    reply = c.connection.request(MsgType.STATUS_REQUEST, {})
    return {**reply.content, "seq": seq}


def fuzz_subscriber(
    cluster: jd.Cluster,
    sockets: Callable[[int], zmq.Socket[Any]],
    marker: Path,
    subscriber: Callable[[ClusterInfo], Callable[[], int]],
    kind: str,
) -> None:
    """Publish floods to a subscriber made by ``subscriber(info)``, which returns its seq reader."""
    pub = sockets(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    pub_port = int(pub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    info = dataclasses.replace(connection_file.read(cluster.connection_file), pub_port=pub_port)
    session = Session(bytes.fromhex(info.key))
    seq_of = subscriber(info)
    state = state_like(cluster, 1_000_000)
    me = psutil.Process()

    def publish_and_wait() -> None:
        state["seq"] += 1
        pub.send_multipart(session.pack(MsgType.STATE, state))
        poll_for(lambda: seq_of() == state["seq"], SYNC_TIMEOUT_S, f"{kind} taking a state")

    # A subscriber hears nothing until its subscription has arrived: publish until it hears.
    poll_for(
        lambda: pub.send_multipart(session.pack(MsgType.STATE, state)) or seq_of() >= state["seq"],
        SYNC_TIMEOUT_S,
        f"{kind} subscribed",
    )
    generator = Generator(bytes.fromhex(info.key), marker)
    types = (MsgType.STATE, MsgType.STATUS_REPLY, MsgType.TASK_REPLY, MsgType.STREAM)
    rss: list[int] = []
    started = time.monotonic()

    def send_batch(batch: list[list[Buffer]]) -> None:
        send_all(pub, batch, [])
        publish_and_wait()
        rss.append(me.memory_info().rss)

    sent = fuzz(generator, types, send_batch)

    assert rss[-1] - rss[0] < RSS_GROWTH_BOUND
    report(kind, sent, started, rss[0], rss[-1])


def test_client_state_subscriber_survives_a_flood_of_bad_messages(
    cluster: jd.Cluster, sockets: Callable[[int], zmq.Socket[Any]], marker: Path
) -> None:
    clients: list[jd.Cluster] = []

    def subscriber(info: ClusterInfo) -> Callable[[], int]:
        clients.append(jd.Cluster(cluster.connection_file, info))
        return lambda: int(clients[0].connection.state.get("seq", 0))

    try:
        fuzz_subscriber(cluster, sockets, marker, subscriber, "client Connection SUB")
        client = clients[0]
        assert client.run("6 * 7") == [42, 42]
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    finally:
        for client in clients:
            client.close()


def test_server_extension_subscriber_survives_a_flood_of_bad_messages(
    cluster: jd.Cluster, sockets: Callable[[int], zmq.Socket[Any]], marker: Path
) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-server-loop", daemon=True)
    thread.start()
    ctx = zmq.asyncio.Context()
    links: list[ClusterLink] = []
    events: list[str] = []

    def on_change(link: ClusterLink) -> None:
        events.append(json.dumps(link.describe()))  # what the websocket sends the panel

    async def make_link(info: ClusterInfo) -> ClusterLink:
        return ClusterLink(Path(cluster.connection_file), info, ctx, on_change)

    def subscriber(info: ClusterInfo) -> Callable[[], int]:
        links.append(asyncio.run_coroutine_threadsafe(make_link(info), loop).result(10))
        return lambda: int(links[0].state.get("seq", 0))

    try:
        fuzz_subscriber(cluster, sockets, marker, subscriber, "server extension SUB")
        reply = asyncio.run_coroutine_threadsafe(
            links[0].request(MsgType.STATUS_REQUEST, {}), loop
        ).result(30)
        assert reply.content["cluster_id"] == cluster.id
        assert json.loads(events[-1])["state"]["seq"] == links[0].state["seq"]
    finally:
        for link in links:
            loop.call_soon_threadsafe(link.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        ctx.term()
        loop.close()
