"""Nothing is left behind: no process and no shared memory of a cluster outlives it.

Processes are found by the cluster's id (in a command line) and as the
controller's descendants taken while it ran (forked engines and their
template carry no id); segments by their names in /dev/shm, which start
with the cluster's id. Never by process name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file, shm
from tests.waiting import poll_for

NBYTES = 2 * shm.SHM_MIN_NBYTES
GONE_TIMEOUT_S = 30  # engines notice a dead controller at their next heartbeat (2 s)


def _segments(cluster_id: str) -> list[str]:
    return sorted(e for e in os.listdir(shm.SHM_DIR) if e.startswith(f"jd-{cluster_id}-"))


def _processes_naming(cluster_id: str) -> list[psutil.Process]:
    """Running processes whose command line holds the cluster's id (controller, fresh engines)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(cluster_id in a for a in cmdline):
            found.append(proc)
    return found


def _is_running(proc: psutil.Process) -> bool:
    try:  # is_running() also tells a reused pid apart by its start time
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ClusterProcesses:
    """Every process of a running cluster, taken once its engines are up."""

    def __init__(self, c: jd.Cluster) -> None:
        self.cluster_id = c.id
        self.controller = psutil.Process(connection_file.read(c.connection_file).controller_pid)
        self.all = [self.controller, *self.controller.children(recursive=True)]
        engine_pids = {e.pid for e in c.status()}
        assert engine_pids <= {p.pid for p in self.all}, "engines are the controller's descendants"
        assert len(self.all) > len(engine_pids), "the engine template is one of them"

    def left(self) -> list[psutil.Process]:
        running = [p for p in self.all if _is_running(p)]
        return running + [p for p in _processes_naming(self.cluster_id) if p not in running]

    def kill_left(self) -> None:
        for proc in self.left():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

    def reap_controller(self) -> None:
        """The controller is this test's child: wait for it, so it is not left a zombie."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.controller.wait(timeout=GONE_TIMEOUT_S)


def _assert_nothing_left(procs: ClusterProcesses) -> None:
    poll_for(lambda: not procs.left(), GONE_TIMEOUT_S, f"no process of cluster {procs.cluster_id}")
    poll_for(
        lambda: not _segments(procs.cluster_id),
        GONE_TIMEOUT_S,
        f"no shared memory of cluster {procs.cluster_id}",
    )


@pytest.fixture
def started(runtime_dir: Path) -> Iterator[tuple[jd.Cluster, ClusterProcesses]]:
    """A 2-engine cluster of this test's own, with its processes; whatever outlives the test is ended."""
    c = jd.Cluster.start(n=2, timeout_s=60)
    procs = ClusterProcesses(c)
    try:
        yield c, procs
    finally:
        c.close()
        procs.kill_left()
        procs.reap_controller()
        for name in _segments(c.id):
            Path(shm.SHM_DIR, name).unlink(missing_ok=True)
        connection_file.path_for(c.id).unlink(missing_ok=True)


def _use_shared_memory(c: jd.Cluster) -> np.ndarray:
    """Leave segments of every kind: pooled, held by engines and held here; return the one held here."""
    arr = np.arange(NBYTES // 8, dtype=np.int64)
    c.push(everywhere=arr)  # one segment both engines map
    c[0].push(mine=arr)  # held by engine 0
    c[1].push(gone=arr)
    c[1].run("del gone")  # back in the pool
    value = c[1].apply(lambda n: np.ones(n, dtype=np.uint8), NBYTES)  # held here
    assert _segments(c.id)
    return value


def test_stop_leaves_no_process_and_no_shared_memory(
    started: tuple[jd.Cluster, ClusterProcesses],
) -> None:
    c, procs = started
    value = _use_shared_memory(c)
    c.stop()
    procs.reap_controller()
    _assert_nothing_left(procs)
    assert int(value.sum()) == NBYTES  # the mapping outlives the file


def test_a_killed_controller_leaves_no_process_and_no_shared_memory(
    started: tuple[jd.Cluster, ClusterProcesses],
) -> None:
    c, procs = started
    value = _use_shared_memory(c)
    c[0].run("import time; time.sleep(60)", block=False)  # one engine exits from user code
    poll_for(lambda: c.status()[0].state == "busy", 10, "engine 0 busy")
    procs.controller.send_signal(signal.SIGKILL)
    procs.reap_controller()
    _assert_nothing_left(procs)
    assert int(value.sum()) == NBYTES
    del value  # its segment was removed: releasing it puts nothing back
    assert not _segments(c.id)


CLIENT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jupyter_dist as jd

    c = jd.Cluster.connect(sys.argv[1])
    held = c[0].apply(lambda: np.ones(2**21, np.uint8))  # a segment this process holds
    x = np.ones(2**30, np.uint8)
    while True:
        c.push(x=x)
    """
)


def test_a_client_killed_while_it_sends_a_gigabyte_leaves_nothing(
    started: tuple[jd.Cluster, ClusterProcesses],
) -> None:
    c, procs = started
    client = subprocess.Popen([sys.executable, "-c", CLIENT, c.id])
    owned = f"-{client.pid}"  # held by it, or being written by it

    def being_written() -> bool:
        return any(e.endswith(f".writing{owned}") for e in _segments(c.id))

    try:
        poll_for(being_written, 60, "the client's gigabyte being copied")
        client.send_signal(signal.SIGKILL)
    finally:
        client.kill()
        client.wait()
    assert any(e.endswith(owned) for e in _segments(c.id))
    # The cluster runs on, and gives back the dead client's memory meanwhile.
    poll_for(
        lambda: not any(e.endswith(owned) for e in _segments(c.id)),
        10,
        "no segment of the killed client",
    )
    assert c.run("'still serving'") == ["still serving"] * 2
    c.stop()
    procs.reap_controller()
    _assert_nothing_left(procs)


def _in_flight(cluster_id: str) -> list[str]:
    """Segments named in a message and not yet taken (no suffix: not held, pooled or written)."""
    return [
        e
        for e in _segments(cluster_id)
        if "." not in e and "-free-" not in e and "-started-" not in e
    ]


def _hold_engines(c: jd.Cluster, gate: Path) -> jd.Future:
    return c.run(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)", block=False
    )


BROADCASTER = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    import jupyter_dist as jd

    c = jd.Cluster.connect(sys.argv[1])
    c.push(x=np.ones(2**21, np.uint8), block=False)  # one segment both engines map
    c.status()  # answered after the push went out
    open(sys.argv[2], "w").close()
    threading.Event().wait()
    """
)


def test_a_broadcast_whose_sender_was_killed_leaves_no_shared_memory(
    started: tuple[jd.Cluster, ClusterProcesses], tmp_path: Path
) -> None:
    c, _ = started
    gate, sent = tmp_path / "gate", tmp_path / "sent"
    hold = _hold_engines(c, gate)
    client = subprocess.Popen([sys.executable, "-c", BROADCASTER, c.id, str(sent)])
    try:
        poll_for(sent.exists, 60, "the broadcast sent")
    finally:
        client.kill()
        client.wait()
    assert len(_in_flight(c.id)) == 1  # its sender would have removed it once both replied
    gate.touch()
    hold.result(timeout=20)
    poll_for(lambda: not _in_flight(c.id), 10, "the broadcast's segment removed")
    assert c.run("int(x.sum())") == [2**21] * 2  # the engines' mappings outlive the file


def test_a_task_that_never_ran_leaves_no_shared_memory(
    started: tuple[jd.Cluster, ClusterProcesses], tmp_path: Path
) -> None:
    c, _ = started
    gate = tmp_path / "gate"
    _hold_engines(c, gate)
    pushed = c[1].push(y=np.ones(2**21, np.uint8), block=False)  # queued behind the hold
    assert len(_in_flight(c.id)) == 1
    victim = c.status()[1].pid
    psutil.Process(victim).kill()
    with pytest.raises(jd.EngineDiedError):
        pushed.result(timeout=20)
    assert not _in_flight(c.id)
    gate.touch()
