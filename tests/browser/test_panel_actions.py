"""The panel's buttons, clicked as a user would: Start cluster, restart an engine, Insert.

The lab, the browser and the page come from ``conftest.py``. Each test waits
on what the panel shows, then checks the processes behind it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file
from tests.nvidia import has_nvidia_driver
from tests.waiting import wait_for_exit

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page, Route

    from tests.browser.conftest import Lab

playwright_sync = pytest.importorskip("playwright.sync_api")

START_S = 15  # from the click to an idle engine: a few seconds, on a busy 2-core machine too
RESTART_S = 15
PID_TITLE = re.compile(r"^pid (\d+) on ")
CLIPPED_JS = """panel => {
  const clipped = [];
  const name = e => e.className || e.tagName;
  const sticksOut = (e, box) => {
    const r = e.getBoundingClientRect();
    return r.left < box.left - 0.5 || r.right > box.right + 0.5;
  };
  for (const e of panel.querySelectorAll('*')) {
    if (sticksOut(e, panel.getBoundingClientRect())) {
      clipped.push(`${name(e)} sticks out of the panel`);
    }
  }
  for (const cluster of panel.querySelectorAll('.jp-dist-Cluster')) {
    for (const e of cluster.querySelectorAll('*')) {
      if (sticksOut(e, cluster.getBoundingClientRect())) {
        clipped.push(`${name(e)} sticks out of its cluster`);
      }
    }
  }
  for (const b of panel.querySelectorAll('button')) {
    if (b.scrollWidth > b.clientWidth || b.scrollHeight > b.clientHeight) {
      clipped.push(`${name(b)} cuts its label`);
    }
  }
  if (panel.scrollWidth > panel.clientWidth) {
    clipped.push('the panel scrolls sideways');
  }
  return clipped;
}"""


def _engine_pid(row: Locator) -> int:
    """The pid the panel shows for an engine (in the title of the row's id cell)."""
    title = row.locator("td[title^='pid ']").get_attribute("title") or ""
    match = PID_TITLE.match(title)
    assert match, f"no pid in the engine row's title {title!r}"
    return int(match.group(1))


def _running_cluster_ids() -> set[str]:
    return {cluster_info.cluster_id for _, cluster_info in connection_file.list_running()}


def test_start_cluster_shows_one_idle_engine_and_stop_ends_its_processes(
    open_panel: Callable[[], Locator], save_screenshot: Callable[[str], Path]
) -> None:
    expect = playwright_sync.expect
    before = _running_cluster_ids()
    panel = open_panel()
    try:
        count = panel.locator(".jp-dist-EngineCount")
        count.click()
        count.press("End")
        count.press("Backspace")  # as a user does: clear the 2, then type 1
        count.press_sequentially("1")
        expect(count).to_have_value("1")
        panel.get_by_role("button", name="Start cluster").click()

        others = "".join(f":not([data-cluster-id='{cluster_id}'])" for cluster_id in before)
        new = panel.locator(f".jp-dist-Cluster{others}")
        rows = new.locator(".jp-dist-EngineRow")
        expect(rows.locator(".jp-dist-EngineState")).to_have_text(["idle"], timeout=START_S * 1000)
        expect(new.locator(".jp-dist-ClusterSummary")).to_contain_text("1/1 engines")
        expect(panel.locator(".jp-dist-Error")).to_have_count(0)
        save_screenshot("panel-started")

        cluster_id = new.get_attribute("data-cluster-id") or ""
        controller_pid = connection_file.read(connection_file.path_for(cluster_id)).controller_pid
        pids = [controller_pid, _engine_pid(rows.first)]
        new.get_by_role("button", name="Stop").click()
        expect(new).to_have_count(0, timeout=20_000)
        assert wait_for_exit(pids, 10) == []
    finally:
        for cluster_id in _running_cluster_ids() - before:  # the test failed halfway
            jd.Cluster.connect(cluster_id).stop()


@pytest.mark.skipif(has_nvidia_driver(), reason="checks a machine without an NVIDIA driver")
def test_gpus_all_without_a_driver_shows_the_server_s_reason_and_starts_nothing(
    open_panel: Callable[[], Locator], save_screenshot: Callable[[str], Path]
) -> None:
    expect = playwright_sync.expect
    before = _running_cluster_ids()
    panel = open_panel()
    count = panel.locator(".jp-dist-EngineCount")
    per_engine = panel.locator(".jp-dist-GpusPerEngine")
    expect(panel.locator(".jp-dist-Gpus")).to_have_attribute("placeholder", "none, all, 2 or 0,3")
    expect(per_engine).to_be_disabled()  # without GPUs it means nothing

    panel.locator(".jp-dist-Gpus").fill("all")
    count.fill("")  # with GPUs: one engine per GPU share
    expect(per_engine).to_be_enabled()
    per_engine.fill("1")
    start = panel.get_by_role("button", name="Start cluster")
    expect(start).to_be_enabled()
    start.click()

    error = panel.locator(".jp-dist-Error")
    expect(error).to_contain_text("NVIDIA GPU and its driver", timeout=START_S * 1000)
    expect(error).to_contain_text("this machine has no NVIDIA driver")
    save_screenshot("panel-gpus-refused")
    assert panel.evaluate(CLIPPED_JS) == []  # the wider form still fits the default width
    assert _running_cluster_ids() == before
    expect(start).to_be_enabled()  # ready for another try


def test_restart_button_fits_beside_a_busy_engine_and_replaces_the_engine(
    fresh_cluster: jd.Cluster,
    open_panel: Callable[[], Locator],
    save_screenshot: Callable[[str], Path],
) -> None:
    expect = playwright_sync.expect

    def wait_forever() -> None:  # local: cloudpickle sends it by value
        threading.Event().wait()

    panel = open_panel()
    view = panel.locator(f".jp-dist-Cluster[data-cluster-id='{fresh_cluster.id}']")
    row = view.locator(".jp-dist-EngineRow[data-engine-id='0']")
    busy = view.locator(".jp-dist-EngineRow[data-engine-id='1']")
    fresh_cluster[1].apply(wait_forever, block=False)
    expect(view.locator(".jp-dist-EngineState")).to_have_text(["idle", "busy"], timeout=30_000)
    save_screenshot("panel-busy")
    # The side panel opens at its default width; the busy row shows a task id.
    assert panel.evaluate(CLIPPED_JS) == []
    old_pid = _engine_pid(row)
    busy_pid = _engine_pid(busy)

    row.get_by_role("button", name="Restart engine 0").click()
    expect(row.locator("td[title^='pid ']")).not_to_have_attribute(
        "title", re.compile(rf"^pid {old_pid} "), timeout=RESTART_S * 1000
    )
    expect(row.locator(".jp-dist-EngineState")).to_have_text("idle", timeout=RESTART_S * 1000)
    new_pid = _engine_pid(row)

    assert wait_for_exit([old_pid], 10) == []
    assert {e.engine_id: e.pid for e in fresh_cluster.status()}[0] == new_pid
    assert fresh_cluster[0].apply(os.getpid) == new_pid
    expect(busy.locator(".jp-dist-EngineState")).to_have_text("busy")
    assert _engine_pid(busy) == busy_pid
    expect(panel.locator(".jp-dist-Error")).to_have_count(0)
    fresh_cluster.stop()
    assert wait_for_exit([new_pid], 10) == []  # the fixture knows only the first engines


def _api(lab: Lab, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"{lab.url}api/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {lab.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read()
    return json.loads(text) if text else None


def test_insert_adds_a_connect_cell_to_the_notebook_even_while_it_loads(
    cluster: jd.Cluster, lab: Lab, page: Page, open_panel: Callable[[], Locator]
) -> None:
    expect = playwright_sync.expect
    name = f"insert-{secrets.token_hex(4)}.ipynb"
    # No kernelspec: JupyterLab asks which kernel to start, and the user picks none
    # (inserting a cell needs no kernel, and the machine's cores are shared).
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    _api(lab, "PUT", f"contents/{name}", {"type": "notebook", "content": notebook})
    held: list[Route] = []

    def hold_first_load(route: Route) -> None:  # a slow server: the file comes when we say
        if held:
            route.continue_()
        else:
            held.append(route)

    panel = open_panel()
    view = panel.locator(f".jp-dist-Cluster[data-cluster-id='{cluster.id}']")
    insert = view.get_by_role("button", name="Insert connect")
    insert.click()  # no notebook is open yet
    warning = page.locator(".jp-Notification-Toast-warning", has_text="Open a notebook first")
    expect(warning).to_be_visible()

    page.route(lambda url: f"/api/contents/{name}?" in url and "content=1" in url, hold_first_load)
    page.locator(".jp-SideBar [data-id='filebrowser']").click()
    page.locator(".jp-DirListing-item", has_text=name).dblclick()
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    expect(cells.locator(".cm-content")).to_be_visible(timeout=30_000)  # a placeholder cell
    assert len(held) == 1, "the notebook showed a cell before it asked for its file"
    page.locator(".jp-SideBar [data-id='jupyter-dist-panel']").click()
    insert.click()
    held[0].continue_()
    page.locator(".jp-Dialog").get_by_role("button", name="No Kernel").click()

    expect(cells.first.locator(".cm-line")).to_have_text(["x = 1"], timeout=30_000)
    inserted = cells.filter(has_text="jd.Cluster.connect")
    expect(inserted.locator(".cm-line")).to_have_text(
        ["import jupyter_dist as jd", f'c = jd.Cluster.connect("{cluster.id}")']
    )
    expect(cells).to_have_count(2)
