"""A memory limit per engine: an engine over it is stopped and replaced, the others go on.

Real engines allocate real memory here: 600 MB against a 300 MB limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file
from jupyter_dist.quantities import format_nbytes
from tests.conftest import _run_cluster
from tests.integration.kernel_session import KernelSession
from tests.waiting import poll_for, wait_for_exit

LIMIT = "300MB"
# Fills 600 MB, 10 MB at a time (each chunk written, so resident), then holds it: only
# the limit can end this task.
HOG = "import time\nchunks = [bytearray(b'x') * 10_000_000 for _ in range(60)]\ntime.sleep(60)"


@pytest.fixture
def limited_cluster(runtime_dir: Path, request: pytest.FixtureRequest) -> Iterator[jd.Cluster]:
    """A 2-engine cluster of this test's own whose engines may use 300 MB each."""
    yield from _run_cluster(runtime_dir, 2, request, memory_limit=LIMIT)


def _engine(c: jd.Cluster, engine_id: int) -> jd.EngineStatus:
    return next(e for e in c.status() if e.engine_id == engine_id)


def test_an_engine_over_its_limit_fails_its_task_and_comes_back_while_the_other_works_on(
    limited_cluster: jd.Cluster, tmp_path: Path
) -> None:
    c = limited_cluster
    assert [e.memory_limit_bytes for e in c.status()] == [300_000_000, 300_000_000]
    victim_pid = _engine(c, 1).pid
    go_on = tmp_path / "go-on"
    steady = c[0].run(
        "import os, time\n"
        "data = bytearray(b'y') * 50_000_000\n"  # within the limit
        f"while not os.path.exists({str(go_on)!r}):\n"
        "    time.sleep(0.01)\n"
        "len(data)",
        block=False,
    )
    poll_for(lambda: _engine(c, 0).state == "busy", 10, "engine 0 busy")
    started = time.monotonic()
    hog = c[1].run(HOG, block=False)
    with pytest.raises(jd.EngineDiedError) as info:
        hog.result(timeout=30)
    assert time.monotonic() - started < 10  # the task would have held its memory for 60 s
    error = info.value
    assert error.engine_id == 1
    assert error.memory_limit_bytes == 300_000_000
    assert error.rss_bytes is not None
    assert error.rss_bytes > 300_000_000
    assert error.is_restarting
    message = str(error)
    assert (
        f"Engine 1 used {format_nbytes(error.rss_bytes, like=300_000_000)}, over its 300 MB limit"
        in message
    )
    assert f"during task {hog.children[0].id}" in message  # the task, not the view's future
    assert "A fresh engine 1 takes its place" in message
    assert not steady.done()  # engine 0 never noticed
    go_on.write_text("")
    assert steady.result(timeout=10) == 50_000_000
    poll_for(
        lambda: _engine(c, 1).state == "idle" and _engine(c, 1).pid != victim_pid,
        30,
        "a fresh engine 1",
    )
    assert wait_for_exit([victim_pid], 10) == []
    assert c[1].run("'back'") == "back"
    assert c.run("len(data) if 'data' in dir() else None") == [50_000_000, None]
    assert _engine(c, 1).memory_limit_bytes == 300_000_000


def test_a_task_over_the_memory_limit_is_not_retried_elsewhere(limited_cluster: jd.Cluster) -> None:
    def hog() -> None:  # it would take the next engine over the limit too
        exec(HOG)

    with pytest.raises(jd.EngineDiedError, match="over its 300 MB limit") as info:
        limited_cluster.submit(hog, retries=2).result(timeout=30)
    assert len(info.value.died_on) == 1


def test_memory_limit_and_oom_kill_in_a_notebook(runtime_dir: Path) -> None:
    session = KernelSession({**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir)})
    try:
        session.run("%load_ext jupyter_dist")
        bad = session.run("%dist start -n 2 --memory-limit lots")
        assert "UsageError: %dist start: argument --memory-limit: 'lots' is not a size" in (
            bad.text("stderr")
        )
        assert '"2GB", "512MB" or "1.5GiB"' in bad.text("stderr")
        assert "Started" not in bad.text()
        started = session.run(f"%dist start -n 2 --memory-limit {LIMIT}")
        assert started.error is None, started.error
        assert "with 2 engines of at most 300 MB each" in started.text()
        assert "memory limit per engine: 300 MB" in session.run("%dist status").text()

        over = session.run(f"%%distributed --targets 1\n{HOG}", timeout_s=60)
        assert over.error is not None
        assert over.error["ename"] == "EngineDiedError"
        assert "Engine 1 used " in over.error["evalue"]
        assert "over its 300 MB limit" in over.error["evalue"]
        poll_for(
            lambda: "idle" in session.run("print(dist_cluster.status()[1].state)").text(),
            30,
            "engine 1 back after its memory ran over",
        )
        assert session.run("print(dist_cluster[1].run('\"back\"'))").text() == "back\n"

        # The OOM killer ends a process with SIGKILL: the error names memory, restart brings it back.
        session.run("f = dist_cluster[0].run('import time; time.sleep(60)', block=False)")
        pid = int(session.run("print(dist_cluster.status()[0].pid)").text())
        poll_for(
            lambda: "busy" in session.run("print(dist_cluster.status()[0].state)").text(),
            10,
            "engine 0 busy",
        )
        os.kill(pid, signal.SIGKILL)
        killed = session.run("f.result(timeout=20)")
        assert killed.error is not None
        assert killed.error["ename"] == "EngineDiedError"
        assert "died with SIGKILL(-9)" in killed.error["evalue"]
        assert "The OS may have killed it for memory." in killed.error["evalue"]
        restarted = session.run("%dist restart").text()
        assert f"engine 0 (pid {pid}) had died: SIGKILL(-9)" in restarted
        assert "Restarted engines 0." in restarted
        back = session.run("%%distributed\n'alive'")
        assert back.error is None, back.error
        assert len(back.of_type("display_data")) == 2
    finally:
        session.run("%dist stop")
        session.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_start_passes_the_memory_limit_and_refuses_a_bad_one(runtime_dir: Path) -> None:
    bad = _cli("start", "-n", "1", "--memory-limit", "2 gigs")
    assert bad.returncode == 2
    assert "--memory-limit: '2 gigs' is not a size" in bad.stderr
    started = _cli("start", "-n", "1", "--memory-limit", "1.5GiB")
    assert started.returncode == 0, started.stderr
    c = jd.Cluster.connect(started.stdout.strip())
    try:
        assert [e.memory_limit_bytes for e in c.status()] == [3 * 2**29]
    finally:
        c.stop()


def test_cluster_start_refuses_a_bad_memory_limit_before_starting_anything(
    runtime_dir: Path,
) -> None:
    before = set(runtime_dir.iterdir())
    with pytest.raises(ValueError, match=r"'lots' is not a size: give .*\"1\.5GiB\""):
        jd.Cluster.start(n=1, memory_limit="lots")
    assert set(runtime_dir.iterdir()) == before  # no controller, no log, no connection file


def test_an_engine_started_elsewhere_over_its_limit_is_stopped_and_not_restarted(
    runtime_dir: Path,
) -> None:
    cluster_id = f"memlimit-{os.getpid()}-{time.monotonic_ns()}"
    controller = subprocess.Popen(
        [sys.executable, "-m", "jupyter_dist.cli", "controller", "--cluster-id", cluster_id,
         "-n", "0", "--memory-limit", LIMIT],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    engine: subprocess.Popen[bytes] | None = None
    try:
        path = connection_file.path_for(cluster_id)
        poll_for(path.exists, 30, "connection file")
        engine = subprocess.Popen(  # as a user starts one on another host
            [sys.executable, "-m", "jupyter_dist.cli", "engine", "--connection-file", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        c = jd.Cluster.connect(cluster_id)
        c.wait_for_engines(1, 30)
        with pytest.raises(jd.EngineDiedError) as info:
            c[0].run(HOG, block=False).result(timeout=30)
        assert "over its 300 MB limit" in str(info.value)
        assert "`%dist restart 0` replaces it" in str(info.value)
        assert not info.value.is_restarting
        assert engine.wait(timeout=10) == 0  # it ended itself when told to, mid-task
        assert [e.state for e in c.status()] == ["dead"]
        c.stop()
    finally:
        for proc in (engine, controller):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        connection_file.path_for(cluster_id).unlink(missing_ok=True)
