"""The JupyterLab panel in a real browser: Debian's chromium driven by Playwright.

A real ``jupyter lab`` (with the built panel and the server extension, as
``pip install`` leaves them) serves under ``/`` and under a JupyterHub-like
base URL. Each run saves a screenshot in ``tests/browser/screenshots/``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file
from tests.waiting import poll_for

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).parent / "screenshots"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")


@dataclass
class Lab:
    url: str  # ends with the base URL's slash
    token: str
    log: Path


@pytest.fixture
def lab_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runtime dir of this test's own: the lab sees only the clusters the test starts."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    return runtime


def _start_lab(tmp_path: Path, runtime: Path, base_url: str) -> Iterator[Lab]:
    token = secrets.token_hex(16)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    log = tmp_path / "lab.log"
    args = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0",
        f"--ServerApp.base_url={base_url}", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tmp_path}", f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--allow-root",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)},
        )
    try:
        info: dict[str, object] = {}

        def server_file_written() -> bool:
            for path in runtime.glob(f"jpserver-{process.pid}.json"):
                info.update(json.loads(path.read_text()))
            return bool(info) or process.poll() is not None

        poll_for(server_file_written, 60, "the lab server's runtime file")
        if process.poll() is not None:
            pytest.fail(f"jupyter lab exited:\n{log.read_text()[-3000:]}")
        yield Lab(url=str(info["url"]), token=token, log=log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(params=["/", "/user/alice/lab-base/"], ids=["root", "base-url"])
def lab(request: pytest.FixtureRequest, tmp_path: Path, lab_runtime: Path) -> Iterator[Lab]:
    yield from _start_lab(tmp_path, lab_runtime, request.param)


@pytest.fixture
def page(lab: Lab) -> Iterator[object]:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            yield page
        finally:
            browser.close()


def _gone(pids: list[int], timeout_s: float) -> list[int]:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_the_panel_shows_engines_and_actors_live_and_stops_the_cluster(
    lab: Lab, page: object, request: pytest.FixtureRequest
) -> None:
    expect = playwright_sync.expect

    class Counter:  # local: cloudpickle sends it by value, engines need not import this module
        def __init__(self, count: int) -> None:
            self.count = count

        def incr(self, by: int) -> int:
            self.count += by
            return self.count

    cluster = jd.Cluster.start(n=2, timeout_s=60)
    try:
        pids = [e.pid for e in cluster.status()]
        pids.append(connection_file.read(cluster.connection_file).controller_pid)
        actor = cluster.actor(Counter, 10)

        page.goto(f"{lab.url}lab?token={lab.token}")  # type: ignore[attr-defined]
        tab = page.locator(".jp-SideBar [data-id='jupyter-dist-panel']")  # type: ignore[attr-defined]
        tab.wait_for(timeout=60_000)
        tab.click()
        panel = page.locator(f".jp-dist-Cluster[data-cluster-id='{cluster.id}']")  # type: ignore[attr-defined]
        rows = panel.locator(".jp-dist-EngineRow")
        expect(rows).to_have_count(2, timeout=30_000)
        expect(rows.locator(".jp-dist-EngineState")).to_have_text(["idle", "idle"], timeout=10_000)
        expect(panel.locator(".jp-dist-Bar-cpu").first).to_be_visible()

        state = panel.locator(".jp-dist-ActorState")
        expect(state).to_contain_text('"count":10', timeout=10_000)
        started = time.monotonic()
        actor.incr(5).result(timeout=10)
        expect(state).to_contain_text('"count":15', timeout=5_000)
        actor_update_s = time.monotonic() - started

        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"panel-{request.node.callspec.id}.png"))  # type: ignore[attr-defined]

        panel.locator(".jp-dist-StopButton").click()
        expect(panel).to_have_count(0, timeout=20_000)
        assert _gone(pids, 10) == []
        assert actor_update_s < 2.0
    finally:
        if connection_file.path_for(cluster.id).exists():
            cluster.stop()
        else:
            cluster.close()
