"""The panel outlives a Jupyter server restart: it says the server is lost, then finds clusters.

This module runs a lab of its own (``lab`` below overrides the session's), so
the test can stop that server by its pid and start it again on the same port
and token while the page stays open.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import jupyter_dist as jd
from tests.browser.lab_server import Lab, LabServer

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

playwright_sync = pytest.importorskip("playwright.sync_api")

LOST_S = 10  # from the server's exit to the notice: the socket closes at once
# The server takes seconds to start, and the panel retries at most every 10 s
# (MAX_RETRY_MS in connection.ts).
FOUND_S = 40
DONE = re.compile(r"tasks: (\d+) done")
STALE = re.compile(r"\bjp-dist-mod-stale\b")


@pytest.fixture
def lab_server(tmp_path: Path, runtime_dir: Path) -> Iterator[LabServer]:
    server = LabServer(tmp_path, runtime_dir, "root")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def lab(lab_server: LabServer) -> Lab:
    """This module's lab, which the ``page`` and ``open_panel`` fixtures use."""
    return lab_server.start()


def _tasks_done(view: Locator) -> int:
    match = DONE.search(view.locator(".jp-dist-TaskCounts").inner_text())
    assert match, "the cluster shows no task counts"
    return int(match.group(1))


@pytest.mark.timeout(240)  # two lab starts, each up to a minute on a busy machine
def test_the_panel_finds_the_running_clusters_again_after_a_jupyter_server_restart(
    fresh_cluster: jd.Cluster,
    lab_server: LabServer,
    page: Page,
    open_panel: Callable[[], Locator],
    tmp_path: Path,
) -> None:
    expect = playwright_sync.expect
    panel = open_panel()
    view = panel.locator(f".jp-dist-Cluster[data-cluster-id='{fresh_cluster.id}']")
    states = view.locator(".jp-dist-EngineRow .jp-dist-EngineState")
    expect(states).to_have_text(["idle", "idle"], timeout=30_000)
    expect(view).not_to_have_class(STALE)
    done_before = _tasks_done(view)
    page.evaluate("() => { window.jpDistSamePage = true; }")  # a reload would forget it

    lab_server.stop()
    lost = panel.locator(".jp-dist-Lost")
    expect(lost).to_have_text("Lost the Jupyter server; reconnecting…", timeout=LOST_S * 1000)
    expect(view).to_have_class(STALE)  # still shown, as last seen, never as live
    expect(view.get_by_role("button", name="Stop")).to_be_disabled()
    expect(panel.get_by_role("button", name="Start cluster")).to_be_disabled()
    page.screenshot(path=str(tmp_path / "panel-lost.png"))
    # Work done while the server is away shows only once the panel is live again.
    for _ in range(3):
        fresh_cluster[0].apply(os.getpid)

    lab_server.start()
    expect(lost).to_have_count(0, timeout=FOUND_S * 1000)
    expect(view).not_to_have_class(STALE)
    expect(states).to_have_text(["idle", "idle"], timeout=10_000)
    expect(view.locator(".jp-dist-TaskCounts")).to_contain_text(
        f"tasks: {done_before + 3} done", timeout=10_000
    )
    expect(view.get_by_role("button", name="Stop")).to_be_enabled()
    assert page.evaluate("() => window.jpDistSamePage") is True
    page.screenshot(path=str(tmp_path / "panel-found.png"))
    print(f"screenshots in {tmp_path}")
