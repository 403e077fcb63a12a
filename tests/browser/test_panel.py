"""The JupyterLab panel shows a cluster live: engines, actors, and its Stop button.

The lab, the browser and the page come from ``conftest.py``; each run saves a
screenshot in ``tests/browser/screenshots/``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file
from tests.waiting import wait_for_exit

if TYPE_CHECKING:
    from playwright.sync_api import Locator

playwright_sync = pytest.importorskip("playwright.sync_api")


def test_the_panel_shows_engines_and_actors_live_and_stops_the_cluster(
    open_panel: Callable[[], Locator], save_screenshot: Callable[[str], Path]
) -> None:
    expect = playwright_sync.expect

    class Counter:  # local: cloudpickle sends it by value, engines need not import this module
        def __init__(self, count: int) -> None:
            self.count = count

        def incr(self, by: int) -> int:
            self.count += by
            return self.count

    cluster = jd.Cluster.start(n=2, timeout_s=60, idle_timeout="1h")
    try:
        pids = [e.pid for e in cluster.status()]
        pids.append(connection_file.read(cluster.connection_file).controller_pid)
        actor = cluster.actor(Counter, 10)

        panel = open_panel().locator(f".jp-dist-Cluster[data-cluster-id='{cluster.id}']")
        rows = panel.locator(".jp-dist-EngineRow")
        expect(rows).to_have_count(2, timeout=30_000)
        expect(rows.locator(".jp-dist-EngineState")).to_have_text(["idle", "idle"], timeout=10_000)
        expect(panel.locator(".jp-dist-Bar-cpu").first).to_be_visible()
        countdown = panel.locator(".jp-dist-IdleCountdown")
        expect(countdown).to_contain_text(re.compile(r"idle: stops itself in (59m \d\ds|1h 00m)"))

        state = panel.locator(".jp-dist-ActorState")
        expect(state).to_contain_text('"count":10', timeout=10_000)
        started = time.monotonic()
        actor.incr(5).result(timeout=10)
        expect(state).to_contain_text('"count":15', timeout=5_000)
        actor_update_s = time.monotonic() - started

        save_screenshot("panel")

        panel.locator(".jp-dist-StopButton").click()
        expect(panel).to_have_count(0, timeout=20_000)
        assert wait_for_exit(pids, 10) == []
        assert actor_update_s < 2.0
    finally:
        if connection_file.path_for(cluster.id).exists():
            cluster.stop()
        else:
            cluster.close()
