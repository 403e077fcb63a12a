"""Markers by folder, and the shared cluster fixtures that start real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file, shm

pytest_plugins = ["pytest_jupyter.jupyter_server"]  # jp_fetch, jp_ws_fetch: a real Jupyter server

HERE = Path(__file__).parent
LOG_TAIL_LINES = 50


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).relative_to(HERE).parts[0]
        if folder in ("unit", "integration", "browser"):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Jupyter runtime dir of the test session's own, so tests never see a user's clusters."""
    path = tmp_path_factory.mktemp("runtime")
    old = os.environ.get("JUPYTER_RUNTIME_DIR")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(path)
    shm_before = _shared_memory_files()
    yield path
    leaked = _end_running_clusters()
    if old is None:
        del os.environ["JUPYTER_RUNTIME_DIR"]
    else:
        os.environ["JUPYTER_RUNTIME_DIR"] = old
    if leaked:
        pytest.fail(f"clusters outlived the tests that started them, now killed: {leaked}")
    left = _shared_memory_left(shm_before)
    if left:
        pytest.fail(f"the tests left shared memory behind (now removed): {left}")


def _shared_memory_files() -> set[str]:
    return {name for name in os.listdir(shm.SHM_DIR) if name.startswith("jd-")}


def _shared_memory_left(before: set[str], timeout_s: float = 10.0) -> list[str]:
    """Files of this session's clusters still in /dev/shm once the last process had time to exit."""
    deadline = time.monotonic() + timeout_s
    while (left := sorted(_shared_memory_files() - before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name in left:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(shm.SHM_DIR, name))
    return left


def _end_running_clusters() -> list[str]:
    """Kill every cluster still running in the session's runtime dir: controller, template, engines."""
    running = connection_file.list_running()
    for _, info in running:
        with contextlib.suppress(psutil.NoSuchProcess):
            controller = psutil.Process(info.controller_pid)
            _kill_tree([controller])
    return [info.cluster_id for _, info in running]


def _print_logs(runtime: Path, cluster_id: str) -> None:
    for log in sorted(runtime.glob(f"jupyter-dist-{cluster_id}*.log")):
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print(f"---- {log.name} ----")
        print("\n".join(lines))


def _kill_tree(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            for child in proc.children(recursive=True):
                child.send_signal(signal.SIGKILL)
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def cluster(runtime_dir: Path, request: pytest.FixtureRequest) -> Iterator[jd.Cluster]:
    """A 2-engine cluster shared by the whole session; fails teardown if a process outlives it."""
    yield from _run_cluster(runtime_dir, 2, request)


@pytest.fixture
def fresh_cluster(runtime_dir: Path, request: pytest.FixtureRequest) -> Iterator[jd.Cluster]:
    """A 2-engine cluster of this test's own, for tests that kill engines or stop it."""
    yield from _run_cluster(runtime_dir, 2, request)


def _run_cluster(
    runtime_dir: Path, n: int | None, request: pytest.FixtureRequest, **options: Any
) -> Iterator[jd.Cluster]:
    c = jd.Cluster.start(n=n, timeout_s=60, **options)
    engine_pids = [e.pid for e in c.status()]
    controller_pid = connection_file.read(c.connection_file).controller_pid
    failed_before = request.session.testsfailed
    try:
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            _print_logs(runtime_dir, c.id)
        with contextlib.suppress(jd.JupyterDistError):  # already stopped by the test
            c.stop()
        leftovers = []
        for pid in [controller_pid, *engine_pids]:
            try:
                proc = psutil.Process(pid)
                proc.wait(timeout=10)
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                leftovers.append(proc)
        if leftovers:
            _print_logs(runtime_dir, c.id)
            _kill_tree(leftovers)
            pytest.fail(f"processes outlived cluster {c.id}: {[p.pid for p in leftovers]}")
