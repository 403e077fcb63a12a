"""A real JupyterLab and Debian's chromium, shared by the browser tests.

One ``jupyter lab`` (with the built panel and the server extension, as
``pip install`` leaves them) serves the whole session under ``/``, and another
one under a JupyterHub-like base URL: a lab takes seconds to start. Each test
gets a fresh chromium showing a workspace of its own. The lab follows the
session's ``runtime_dir``, so clusters that tests start with
``jd.Cluster.start`` (or the ``cluster`` fixtures) appear in its panel.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.lab_server import (
    BASE_URLS,
    LAB_START_TIMEOUT_S,
    LOG_TAIL_CHARS,
    Lab,
    LabServer,
)

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"needs {CHROMIUM}")
    for item in items:
        if not CHROMIUM.exists() and here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=list(BASE_URLS), ids=list(BASE_URLS))
def lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, runtime_dir: Path
) -> Iterator[Lab]:
    """A running ``jupyter lab`` under ``/`` or a base URL, its root dir a fresh tmp dir."""
    server = LabServer(tmp_path_factory.mktemp("lab"), runtime_dir, request.param)
    try:
        yield server.start()
    finally:
        server.stop()


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
