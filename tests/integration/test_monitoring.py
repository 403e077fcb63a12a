"""Seeing a running cluster: engine metrics in the state stream, and the notebook monitor."""

from __future__ import annotations

import os
import signal
import time

import jupyter_dist as jd
from tests.waiting import poll_for


def test_engines_report_cpu_memory_and_their_gpus_in_the_state(fresh_cluster: jd.Cluster) -> None:
    def reported() -> bool:
        engines = fresh_cluster.connection.state.get("engines", [])
        return len(engines) == 2 and all("gpus" in e for e in engines)

    poll_for(reported, 5, "a heartbeat's metrics in the published state")

    for engine in fresh_cluster.status():
        assert (engine.rss_bytes or 0) > 10**6
        assert engine.cpu_percent is not None
        assert isinstance(engine.gpus, list)  # empty on a machine without a GPU


def test_the_monitor_follows_the_cluster_while_work_runs(fresh_cluster: jd.Cluster) -> None:
    monitor = fresh_cluster.monitor()
    try:
        poll_for(lambda: sorted(monitor.engine_rows) == [0, 1], 5, "both engines in the monitor")
        busy = fresh_cluster[0].apply(time.sleep, 3, block=False)
        poll_for(lambda: "busy" in monitor.engine_rows[0].state.value, 2, "engine 0 shown busy")
        assert monitor.engine_rows[0].task.value  # the id of the task at hand

        os.kill(fresh_cluster.status()[1].pid, signal.SIGKILL)
        started = time.monotonic()
        poll_for(lambda: "dead" in monitor.engine_rows[1].state.value, 2, "engine 1 shown dead")
        assert time.monotonic() - started < 1.5
        busy.result(timeout=10)
    finally:
        monitor.close()
    assert monitor._on_state not in fresh_cluster.connection.state_listeners
