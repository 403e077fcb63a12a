"""A cluster started with an idle timeout stops itself once it has had no work for that long."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file, shm
from tests.waiting import poll_for, wait_for_exit


def test_an_idle_cluster_stops_itself_and_leaves_nothing_behind(runtime_dir: Path) -> None:
    c = jd.Cluster.start(n=1, idle_timeout="2s")
    path = Path(c.connection_file)
    try:
        pids = [connection_file.read(path).controller_pid, *(e.pid for e in c.status())]
        assert c.submit(time.sleep, 3).result(timeout=20) is None  # work outlasts the timeout
        assert c.push(big=bytes(shm.SHM_MIN_NBYTES)) is None  # a shared-memory segment
        c.status()
        stop_in_s = c.idle_stop_in_s()
        assert stop_in_s is not None
        assert stop_in_s <= 2.5  # its deadline is kept to the second

        assert wait_for_exit(pids, 20) == [], "the idle cluster did not stop"
        assert not path.exists()
        assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"jd-{c.id}-")]
        log = runtime_dir / f"jupyter-dist-{c.id}-controller.log"
        assert "(the idle timeout); the cluster stops" in log.read_text()
        poll_for(lambda: c.connection.is_controller_gone, 5, "the client noticing")
        with pytest.raises(jd.ControllerGoneError):
            c.run("1")
    finally:
        if path.exists():
            c.stop()
        else:
            c.close()


def test_without_an_idle_timeout_there_is_no_countdown(cluster: jd.Cluster) -> None:
    cluster.status()
    assert cluster.idle_stop_in_s() is None
