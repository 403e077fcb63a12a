"""A real JupyterLab and Debian's chromium, shared by the browser tests.

One ``jupyter lab`` (with the built panel and the server extension, as
``pip install`` leaves them) serves the whole session under ``/``, and another
one under a JupyterHub-like base URL: a lab takes seconds to start. Each test
gets a fresh chromium showing a workspace of its own. The lab follows the
session's ``runtime_dir``, so clusters that tests start with
``jd.Cluster.start`` (or the ``cluster`` fixtures) appear in its panel.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.waiting import poll_for

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

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
LAB_START_TIMEOUT_S = 60
LOG_TAIL_CHARS = 3000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"needs {CHROMIUM}")
    for item in items:
        if not CHROMIUM.exists() and here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@dataclass
class Lab:
    name: str  # "root" or "base-url"
    url: str  # ends with the base URL's slash
    token: str
    log: Path


BASE_URLS = {"root": "/", "base-url": "/user/alice/lab-base/"}


@pytest.fixture(scope="session", params=list(BASE_URLS), ids=list(BASE_URLS))
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, runtime_dir: Path
) -> Iterator[Lab]:
    """A running ``jupyter lab`` under ``/`` or a base URL, its root dir a fresh tmp dir."""
    yield from _start_lab(tmp_path_factory.mktemp("lab"), runtime_dir, request.param)


def _start_lab(tmp: Path, runtime: Path, name: str) -> Iterator[Lab]:
    token = secrets.token_hex(16)
    root = tmp / "root"
    root.mkdir()
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    log = tmp / "lab.log"
    args = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0",
        f"--ServerApp.base_url={BASE_URLS[name]}", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--allow-root",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)},
        )
    try:
        server_info: dict[str, object] = {}

        def server_file_written() -> bool:
            for path in runtime.glob(f"jpserver-{process.pid}.json"):
                try:
                    server_info.update(json.loads(path.read_text()))
                except json.JSONDecodeError:  # the server is still writing it
                    return False
            return bool(server_info) or process.poll() is not None

        poll_for(server_file_written, LAB_START_TIMEOUT_S, "the lab server's runtime file")
        if process.poll() is not None:
            pytest.fail(f"jupyter lab exited:\n{log.read_text()[-LOG_TAIL_CHARS:]}")
        yield Lab(name=name, url=str(server_info["url"]), token=token, log=log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def page(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A page in a fresh chromium; prints the lab's log if the test failed.

    Playwright starts and stops inside the test: pytest_jupyter's autouse
    ``jp_asyncio_loop`` closes the current loop after each test, and Playwright's
    sync API keeps one running while it is started.
    """
    playwright_sync = pytest.importorskip("playwright.sync_api")
    failed_before = request.session.testsfailed
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()
    if request.session.testsfailed > failed_before:
        print(f"---- {lab.log.name} ----")
        print(lab.log.read_text(errors="replace")[-LOG_TAIL_CHARS:])


@pytest.fixture
def open_panel(lab: Lab, page: Page) -> Callable[[], Locator]:
    """Open JupyterLab on a workspace of its own, then the panel by clicking its tab.

    Returns the panel.
    """

    def open_() -> Locator:
        workspace = f"test-{secrets.token_hex(4)}"
        page.goto(f"{lab.url}lab/workspaces/{workspace}?token={lab.token}")
        tab = page.locator(".jp-SideBar [data-id='jupyter-dist-panel']")
        tab.wait_for(timeout=LAB_START_TIMEOUT_S * 1000)
        tab.click()
        panel = page.locator(".jp-dist-Panel")
        panel.wait_for()
        return panel

    return open_


@pytest.fixture
def save_screenshot(lab: Lab, page: Page) -> Callable[[str], Path]:
    """Save the page as ``screenshots/<name>-<root|base-url>.png`` (gitignored) to look at."""

    def save(name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}-{lab.name}.png"
        page.screenshot(path=str(path))
        return path

    return save
