"""Bad input and dead processes: the cluster fails work clearly and keeps serving."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import zmq

import jupyter_dist as jd
from jupyter_dist import connection_file
from jupyter_dist.controller.app import CHECK_INTERVAL_S, HEARTBEAT_TIMEOUT_S
from jupyter_dist.protocol import DELIM, MsgType, Session
from tests.waiting import poll_for, wait_for_exit


def _controller_log(runtime_dir: Path, cluster: jd.Cluster) -> str:
    return (runtime_dir / f"jupyter-dist-{cluster.id}-controller.log").read_text()


def _raw_dealer(ctx: zmq.Context, url: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_garbage_sent_to_the_state_publisher_changes_nothing(
    cluster: jd.Cluster, zmq_ctx: zmq.Context
) -> None:
    info = connection_file.read(cluster.connection_file)
    sock = _raw_dealer(zmq_ctx, info.url(info.pub_port))
    sock.send_multipart([DELIM, b"forged", b"x", b"x", b"x", b"x"])
    assert cluster.run("'still serving'") == ["still serving", "still serving"]


def _marking_task(tmp_path: Path, task_id: str) -> tuple[Path, dict[str, object]]:
    """A task request for engine 0 whose cell, if it ever ran, would create the returned file."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return marker, {"task_id": task_id, "kind": "execute", "target": 0, "code": code}


@pytest.mark.parametrize("port_name", ["client_port", "engine_port"])
def test_forged_and_truncated_messages_are_dropped_and_never_run(
    cluster: jd.Cluster, runtime_dir: Path, zmq_ctx: zmq.Context, tmp_path: Path, port_name: str
) -> None:
    info = connection_file.read(cluster.connection_file)
    sock = _raw_dealer(zmq_ctx, info.url(getattr(info, port_name)))
    marker, content = _marking_task(tmp_path, "forged-" + port_name)
    forger = Session(b"not-the-cluster-key")
    sock.send_multipart(forger.pack(MsgType.TASK_REQUEST, content))
    honest = Session(bytes.fromhex(info.key))
    frames = honest.pack(MsgType.TASK_REQUEST, {**content, "task_id": "truncated-" + port_name})
    sock.send_multipart(frames[:4])  # cut after the header
    sock.send_multipart([b"garbage", DELIM, b"x"])
    sock.send_multipart(
        honest.pack(MsgType.TASK_REQUEST, {**content, "task_id": "x"})[:2] + [b"\xc1"] * 4
    )
    poll_for(
        lambda: _controller_log(runtime_dir, cluster).count("dropped a message") >= 4,
        10,
        "four drop log lines",
    )
    log = _controller_log(runtime_dir, cluster)
    assert "bad signature" in log
    assert "truncated" in log
    assert cluster.run("'still serving'") == ["still serving", "still serving"]
    assert not marker.exists()


@pytest.mark.parametrize("port_name", ["client_port", "engine_port"])
def test_a_forged_or_broken_batch_is_dropped_whole_and_never_run(
    cluster: jd.Cluster, runtime_dir: Path, zmq_ctx: zmq.Context, tmp_path: Path, port_name: str
) -> None:
    info = connection_file.read(cluster.connection_file)
    sock = _raw_dealer(zmq_ctx, info.url(getattr(info, port_name)))
    logged_before = len(_controller_log(runtime_dir, cluster))
    marker, content = _marking_task(tmp_path, "batched-" + port_name)
    forger = Session(b"not-the-cluster-key")
    envelopes = [
        forger.envelope(MsgType.TASK_REQUEST, {**content, "task_id": f"f{i}"}) for i in (1, 2)
    ]
    sock.send_multipart(forger.frames(envelopes))
    honest = Session(bytes.fromhex(info.key))
    good = honest.envelope(MsgType.TASK_REQUEST, content)
    unclaimed = honest.envelope(MsgType.TASK_REQUEST, {**content, "task_id": "g2"})
    unclaimed.signed = [b"not in its header"]  # the batch's buffers no longer add up
    sock.send_multipart(honest.frames([good, unclaimed]))

    def new_log() -> str:
        return _controller_log(runtime_dir, cluster)[logged_before:]

    poll_for(lambda: new_log().count("dropped a message") >= 2, 10, "two drop log lines")
    log = new_log()
    assert "bad signature" in log
    assert "buffers none of its messages claims" in log
    assert cluster.run("'still serving'") == ["still serving", "still serving"]
    assert not marker.exists()


def test_unknown_message_type_is_dropped(
    cluster: jd.Cluster, runtime_dir: Path, zmq_ctx: zmq.Context
) -> None:
    info = connection_file.read(cluster.connection_file)
    sock = _raw_dealer(zmq_ctx, info.url(info.client_port))
    session = Session(bytes.fromhex(info.key))
    frames = session.pack(MsgType.STATUS_REQUEST, {})
    header = json.loads(json.dumps(__import__("msgpack").unpackb(frames[2])))
    header["msg_type"] = "format_disk_request"
    frames[2] = __import__("msgpack").packb(header)
    import hashlib
    import hmac

    mac = hmac.new(bytes.fromhex(info.key), digestmod=hashlib.sha256)
    for part in frames[2:6]:
        mac.update(part)
    frames[1] = mac.hexdigest().encode()
    sock.send_multipart(frames)
    poll_for(
        lambda: (
            "unknown message type 'format_disk_request'" in _controller_log(runtime_dir, cluster)
        ),
        10,
        "log line",
    )
    assert len(cluster.status()) == 2


def test_connection_file_is_private_and_controller_listens_on_loopback(cluster: jd.Cluster) -> None:
    mode = stat.S_IMODE(os.stat(cluster.connection_file).st_mode)
    assert mode == 0o600
    info = connection_file.read(cluster.connection_file)
    assert info.ip == "127.0.0.1"
    listening = [
        c
        for c in psutil.Process(info.controller_pid).net_connections("tcp")
        if c.status == "LISTEN"
    ]
    assert len(listening) == 3
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    assert {c.laddr.port for c in listening} == {info.client_port, info.engine_port, info.pub_port}


def test_killed_engine_fails_its_task_within_seconds_and_others_go_on(
    fresh_cluster: jd.Cluster,
) -> None:
    c = fresh_cluster
    victim = c.status()[1]
    future = c[1].run("import time; time.sleep(60)", block=False)
    poll_for(lambda: c.status()[1].state == "busy", 10, "engine 1 busy")
    queued = [c.submit(abs, -i) for i in range(40)]
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(jd.EngineDiedError) as info:
        future.result(timeout=10)
    assert time.monotonic() - started < 5
    error = info.value
    assert error.engine_id == 1
    assert error.exit_code == -signal.SIGKILL
    assert "SIGKILL(-9)" in str(error)
    assert "%dist restart 1" in str(error)
    assert [f.result(timeout=10) for f in queued] == list(range(40))  # balanced work moved on
    poll_for(lambda: c.live_engine_ids() == [0], 5, "engine 1 marked dead")
    assert c.run("'ok'") == ["ok"]
    with pytest.raises(jd.NoEnginesError, match="engine 1 is not running"):
        c[1].run("1")


def test_stop_leaves_no_process_and_removes_the_connection_file(fresh_cluster: jd.Cluster) -> None:
    c = fresh_cluster
    pids = [connection_file.read(c.connection_file).controller_pid] + [e.pid for e in c.status()]
    path = c.connection_file
    c.stop()
    for pid in pids:
        poll_for(
            lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
            10,
            f"pid {pid} gone",
        )
    assert not os.path.exists(path)
    with pytest.raises(jd.ClusterError):
        c.run("1")


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_start_list_status_stop(runtime_dir: Path) -> None:
    started = _cli("start", "-n", "1")
    assert started.returncode == 0, started.stderr
    cluster_id = started.stdout.strip()
    controller_pid = connection_file.read(connection_file.path_for(cluster_id)).controller_pid
    try:
        assert cluster_id in _cli("list").stdout
        status = _cli("status", cluster_id)
        assert status.returncode == 0, status.stderr
        assert "idle" in status.stdout
    finally:
        stopped = _cli("stop", cluster_id)
    assert stopped.returncode == 0, stopped.stderr
    poll_for(lambda: not psutil.pid_exists(controller_pid), 10, "controller gone")
    assert cluster_id not in _cli("list").stdout
    missing = _cli("status", "nope")
    assert missing.returncode == 1
    assert "No cluster with id 'nope'" in missing.stderr


def test_jupyter_dist_is_a_jupyter_subcommand(runtime_dir: Path) -> None:
    jupyter = Path(sys.executable).parent / "jupyter"
    out = subprocess.run([str(jupyter), "dist", "list"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_stale_connection_file_is_removed(runtime_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = connection_file.ClusterInfo(
        f"stale-{secrets.token_hex(4)}",
        "00" * 32,
        "127.0.0.1",
        1,
        2,
        3,
        dead.pid,
        os.uname().nodename,
        0.0,
    )
    path = connection_file.write(info)
    assert path.exists()
    assert info.cluster_id not in [i.cluster_id for _, i in connection_file.list_running()]
    assert not path.exists()


def test_a_killed_controller_not_yet_reaped_is_not_listed(runtime_dir: Path) -> None:
    # A controller killed (say by the OOM killer) while the kernel that started it
    # lives stays a zombie until that kernel reaps it: its pid exists, nothing answers.
    unreaped = subprocess.Popen([sys.executable, "-c", "pass"])
    poll_for(lambda: psutil.Process(unreaped.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
    info = connection_file.ClusterInfo(
        f"zombie-{secrets.token_hex(4)}",
        "00" * 32,
        "127.0.0.1",
        1,
        2,
        3,
        unreaped.pid,
        os.uname().nodename,
        0.0,
    )
    path = connection_file.write(info)
    try:
        assert info.cluster_id not in [i.cluster_id for _, i in connection_file.list_running()]
        assert not path.exists()
    finally:
        unreaped.wait()


@pytest.fixture
def detached_controller(runtime_dir: Path) -> Iterator[Callable[[int, float], str]]:
    """Start controllers as `jupyter-dist controller` does, each under a unique cluster id.

    Teardown kills whatever of theirs still runs (controller, engine template,
    engines), found by the pids they had, also when the test failed midway.
    """
    started: list[subprocess.Popen[bytes]] = []
    family: list[psutil.Process] = []

    def start(n: int, orphan_timeout_s: float) -> str:
        cluster_id = f"orphan-{secrets.token_hex(4)}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_dist.cli", "controller", "--cluster-id", cluster_id,
             "-n", str(n), "--orphan-timeout", str(orphan_timeout_s)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        started.append(proc)
        poll_for(lambda: connection_file.path_for(cluster_id).exists(), 30, "connection file")
        c = jd.Cluster.connect(cluster_id)
        try:
            c.wait_for_engines(n, 30)
        finally:
            family.extend(psutil.Process(proc.pid).children(recursive=True))
            c.close()
        return cluster_id

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def test_controller_exits_when_all_its_engines_vanished(
    detached_controller: Callable[[int, float], str],
) -> None:
    cluster_id = detached_controller(2, 2)
    c = jd.Cluster.connect(cluster_id)
    controller = psutil.Process(connection_file.read(c.connection_file).controller_pid)
    pids = [e.pid for e in c.status()]
    c.close()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert controller.wait(timeout=30) == 0
    assert not connection_file.path_for(cluster_id).exists()


def test_engines_exit_when_their_controller_vanished(
    detached_controller: Callable[[int, float], str],
) -> None:
    cluster_id = detached_controller(2, 20)
    c = jd.Cluster.connect(cluster_id)
    engine_pids = [e.pid for e in c.status()]
    controller = psutil.Process(connection_file.read(c.connection_file).controller_pid)
    c.close()
    controller.kill()
    assert wait_for_exit(engine_pids, 30) == []


def test_silent_engine_is_declared_dead_by_heartbeat(fresh_cluster: jd.Cluster) -> None:
    c = fresh_cluster
    victim = c.status()[0]
    future = c[0].run("import time; time.sleep(30)", block=False)
    poll_for(lambda: c.status()[0].state == "busy", 10, "engine 0 busy")
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGSTOP)  # alive, but no heartbeats any more
    with pytest.raises(jd.EngineDiedError, match="Engine 0"):
        future.result(timeout=10)
    assert time.monotonic() - started < 6
    poll_for(
        lambda: not psutil.pid_exists(victim.pid), 10, "the stopped engine ended by its controller"
    )
    assert c.run("'ok'") == ["ok"]


def test_an_engine_computing_while_holding_the_gil_is_busy_not_dead(
    fresh_cluster: jd.Cluster,
) -> None:
    # Its I/O thread sends no heartbeat while math.factorial holds the GIL; the process
    # uses CPU all along, which tells the controller it works (as a large import does).
    def hold_the_gil_computing() -> float:
        import math
        import time

        started = time.monotonic()
        math.factorial(900_000)  # about 8 s of one core here, all of it holding the GIL
        return time.monotonic() - started

    c = fresh_cluster
    pid = c.status()[0].pid
    took_s = c[0].apply(hold_the_gil_computing)
    if took_s <= HEARTBEAT_TIMEOUT_S + CHECK_INTERVAL_S:
        pytest.skip(f"this machine held the GIL only {took_s:.1f} s: too fast to be silent")
    assert c.status()[0].pid == pid
    assert c.status()[0].state != "dead"


def test_a_silent_idle_engine_is_declared_dead_too(fresh_cluster: jd.Cluster) -> None:
    c = fresh_cluster
    victim = c.status()[1]  # idle: it beats every 2 s, not every second
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGSTOP)
    poll_for(lambda: c.status()[1].state == "dead", 10, "engine 1 declared dead")
    assert time.monotonic() - started < 6
    assert c[0].run("'ok'") == "ok"


def test_cancel_stops_work_that_has_not_started(cluster: jd.Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    blocker = cluster[0].run("import time; time.sleep(1)", block=False)

    def touch() -> None:
        marker.write_text("ran")

    queued = cluster[[0]].submit(touch)
    assert queued.cancel()
    assert queued.cancelled()
    blocker.result(timeout=10)
    assert cluster[0].run("'after'") == "after"
    assert not marker.exists()
    poll_for(
        lambda: any(t.task_id == queued.id and t.state == "cancelled" for t in cluster.history(20)),
        5,
        "the controller records the task as cancelled",
    )


def test_cluster_listening_beyond_loopback_encrypts_with_curve(
    runtime_dir: Path, zmq_ctx: zmq.Context
) -> None:
    c = jd.Cluster.start(n=1, ip="0.0.0.0")
    try:
        info = connection_file.read(c.connection_file)
        assert len(info.curve_public_key) == 40  # a Z85-encoded Curve key
        assert c.run("'encrypted'") == ["encrypted"]
        plain = _raw_dealer(zmq_ctx, f"tcp://127.0.0.1:{info.client_port}")
        plain.send_multipart(Session(bytes.fromhex(info.key)).pack(MsgType.STATUS_REQUEST, {}))
        assert plain.poll(1000) == 0, "a socket without Curve got an answer"
    finally:
        c.stop()


def test_cluster_on_loopback_does_not_need_curve(cluster: jd.Cluster) -> None:
    assert connection_file.read(cluster.connection_file).curve_public_key == ""


def test_a_killed_controller_fails_pending_work_and_new_calls_within_seconds(
    fresh_cluster: jd.Cluster,
) -> None:
    c = fresh_cluster
    engine_pids = [e.pid for e in c.status()]
    pending = c.submit(time.sleep, 30)
    poll_for(lambda: any(e.state == "busy" for e in c.status()), 10, "the task running")
    controller = psutil.Process(connection_file.read(c.connection_file).controller_pid)
    controller.kill()
    killed = time.monotonic()
    with pytest.raises(jd.ControllerGoneError, match=r"is gone \(its process \d+ ended\)"):
        pending.result(timeout=20)
    assert time.monotonic() - killed < 5
    with pytest.raises(jd.ClusterError, match="Start a new cluster with `%dist start -n 4`"):
        c.run("1")
    c.stop()  # nothing is left to stop: it returns
    assert wait_for_exit(engine_pids, 30) == [], "engines outlived their controller"


def test_a_silent_controller_on_another_host_is_taken_for_gone(
    fresh_cluster: jd.Cluster, tmp_path: Path
) -> None:
    # Only silence can tell a client that a controller elsewhere is gone: give the
    # client a connection file that names another host, then stop the controller.
    fields = json.loads(Path(fresh_cluster.connection_file).read_text())
    remote_view = tmp_path / "elsewhere.json"
    remote_view.write_text(json.dumps({**fields, "host": "elsewhere"}))
    c = jd.Cluster.connect(str(remote_view))
    controller = psutil.Process(fields["controller_pid"])
    pending = c.submit(time.sleep, 30)
    controller.suspend()
    try:
        stopped = time.monotonic()
        with pytest.raises(jd.ControllerGoneError, match="did not answer for"):
            pending.result(timeout=20)
        assert time.monotonic() - stopped < 7
        with pytest.raises(jd.ControllerGoneError):
            c.status()
    finally:
        controller.resume()
        c.close()
    assert fresh_cluster.run("'still serving'") == ["still serving", "still serving"]
