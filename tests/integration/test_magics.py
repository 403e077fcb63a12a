"""The notebook magics in a real kernel: what a cell shows, when, and in which cell."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.kernel_session import KernelSession


def _kernel_env(runtime_dir: Path) -> dict[str, str]:
    return {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir)}


def _start_cluster(kernel: KernelSession, n: int = 2) -> str:
    kernel.run("%load_ext jupyter_dist")
    started = kernel.run(f"%dist start -n {n}")
    assert started.error is None, started.error
    return started.text().split()[2]


@pytest.fixture(scope="module")
def kernel(runtime_dir: Path) -> Iterator[KernelSession]:
    """A kernel with a 2-engine cluster started by `%dist start`, shared by this module."""
    session = KernelSession(_kernel_env(runtime_dir))
    _start_cluster(session)
    yield session
    session.run("%dist stop")
    session.close()


def test_cell_runs_on_every_engine_with_tagged_and_merged_lines(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed\nimport os\nprint('hello')\nprint('pid', os.getpid())")
    out = run.text()
    assert out.count("hello") == 1
    assert "[0,1] hello\n" in out
    assert "[0] pid " in out
    assert "[1] pid " in out


def test_stderr_stays_apart_from_stdout(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed\nimport sys\nprint('to out')\nprint('to err', file=sys.stderr)")
    assert "to out" in run.text("stdout")
    assert "to err" not in run.text("stdout")
    assert "[0,1] to err" in run.text("stderr")


def test_lines_stream_while_the_cell_runs(kernel: KernelSession) -> None:
    run = kernel.run(
        "%%distributed --targets 0\nimport time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
    )
    streams = run.of_type("stream")
    first = next(o for o in streams if "first" in o["content"]["text"])
    second = next(o for o in streams if "second" in o["content"]["text"])
    assert second["at"] - first["at"] > 1.0, "the first line waited for the end of the cell"
    assert run.finished - first["at"] > 1.0


def test_last_expression_is_shown_per_engine(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed\n6 * 7")
    shown = [o["content"] for o in run.of_type("display_data")]
    texts = sorted(c["data"]["text/plain"] for c in shown)
    assert len(texts) == 2
    assert texts[0].startswith("Out[0:")
    assert texts[0].endswith("]: 42")
    assert texts[1].startswith("Out[1:")
    assert {c["metadata"]["jupyter_dist"]["engine_id"] for c in shown} == {0, 1}


def test_rich_outputs_arrive_with_their_mime_types(kernel: KernelSession) -> None:
    run = kernel.run(
        "%%distributed --targets 1\n"
        "from IPython.display import HTML, display\n"
        "display(HTML('<b>bold</b>'))\n"
        "import pandas as pd\n"
        "pd.DataFrame({'a': [1, 2]})\n"
        "display(pd.DataFrame({'col': [1, 2]}))\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "plt.show()\n"
    )
    assert run.error is None, run.error
    shown = [o["content"] for o in run.of_type("display_data")]
    html = [c for c in shown if "<b>bold</b>" in c["data"].get("text/html", "")]
    assert html
    assert html[0]["metadata"]["jupyter_dist"]["engine_id"] == 1
    assert any("image/png" in c["data"] for c in shown), "the figure did not come back"
    assert any(
        "<table" in c["data"].get("text/html", "") and "col" in c["data"]["text/html"]
        for c in shown
    )


def test_error_shows_the_engine_traceback_once_with_cell_lines(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed\nx = 1\ny = 0\nx / y")
    error = run.error
    assert error is not None
    text = "\n".join(error["traceback"])
    assert "[engines 0,1]" in text
    assert text.count("----> 3 x / y") == 1
    assert "ZeroDivisionError" in text
    assert kernel.run("%%distributed\n'alive'").error is None


def test_different_errors_each_show(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed\nimport os\nraise ValueError(str(os.getpid()))")
    text = "\n".join(run.error["traceback"])
    assert "[engines 0]" in text
    assert "[engines 1]" in text


def test_syntax_error_shows_plainly_and_nothing_runs(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed\nmarker_syntax = 1\ndef broken(:\n    pass")
    assert run.error is not None
    assert run.error["ename"] == "SyntaxError"
    check = kernel.run("%%distributed\n'marker_syntax' in globals()")
    texts = [o["content"]["data"]["text/plain"] for o in check.of_type("display_data")]
    assert all(t.endswith("False") for t in texts)


def test_targets_noblock_and_output_to_the_starting_cell(kernel: KernelSession) -> None:
    started = kernel.run(
        "%%distributed --targets 1 --noblock\nimport time\ntime.sleep(1)\nprint('late line')"
    )
    assert started.error is None
    assert "late line" not in started.text()
    later = kernel.run("import time\ntime.sleep(2)\nprint('other cell')")
    assert "late line" not in later.text(), "output went to the cell that runs now"
    routed = [o for o in kernel.other_outputs if "late line" in o["content"].get("text", "")]
    assert routed
    assert routed[0]["parent"] == started.msg_id


def test_targets_range_and_bad_options(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed --targets 0:1\nimport os\nos.getpid()")
    assert len(run.of_type("display_data")) == 1
    bad = kernel.run("%%distributed --frobnicate\n1")
    assert "UsageError: %%distributed: unrecognized arguments: --frobnicate" in bad.text("stderr")
    assert not bad.of_type("display_data"), "the cell ran despite the bad option"
    bad = kernel.run("%dist start -n two")
    assert "invalid int value: 'two'" in bad.text("stderr")
    bad = kernel.run("%dist start --idle-timeout soon")
    assert "'soon' is not a duration: write seconds (90) or a number with a unit" in bad.text(
        "stderr"
    )
    bad = kernel.run("%dist start --launcher slurm")
    assert "launcher 'slurm' is not available" in bad.text("stderr")
    assert "Started" not in bad.text()


def test_scatter_and_gather_between_notebook_and_engines(kernel: KernelSession) -> None:
    kernel.run("data = list(range(10))")
    run = kernel.run(
        "%%distributed --scatter data --gather squares\nsquares = [v * v for v in data]"
    )
    assert run.error is None, run.error
    check = kernel.run("print(squares)")
    assert check.text() == str([v * v for v in range(10)]) + "\n"


def test_local_also_runs_in_the_notebook(kernel: KernelSession) -> None:
    kernel.run("%%distributed --local\nboth_places = 'yes'")
    assert kernel.run("print(both_places)").text() == "yes\n"


def test_autodist_toggles(kernel: KernelSession) -> None:
    kernel.run("%autodist")
    run = kernel.run("print('hi from autodist')")
    assert "[0,1] hi from autodist" in run.text()
    kernel.run("%autodist")
    local = kernel.run("print('local')")
    assert local.text() == "local\n"


def test_dist_status_who_and_help(kernel: KernelSession) -> None:
    status = kernel.run("%dist status").text()
    assert "idle" in status
    assert "pid" in status
    kernel.run("%%distributed\nimport numpy as np\nwho_array = np.zeros((3, 4))")
    kernel.run("%%distributed --targets 1\nonly_on_one = 5")
    who = kernel.run("%dist who").text()
    assert "who_array" in who
    assert "(3, 4)" in who
    line = next(li for li in who.splitlines() if li.startswith("only_on_one"))
    assert line.rstrip().endswith("1")
    assert "start" in kernel.run("%dist --help").text()
    monitor = kernel.run("%dist monitor")
    assert monitor.error is None
    assert any(
        "application/vnd.jupyter.widget-view+json" in o["content"]["data"]
        for o in monitor.of_type("execute_result")
    )


def test_restart_replaces_an_engine_in_place(kernel: KernelSession) -> None:
    before = kernel.run("%%distributed --targets 1\nimport os\nos.getpid()")
    pid_before = int(
        before.of_type("display_data")[0]["content"]["data"]["text/plain"].split(": ")[1]
    )
    run = kernel.run("%dist restart 1")
    assert "Restarted engines 1" in run.text()
    assert not psutil.pid_exists(pid_before) or psutil.Process(pid_before).status() == "zombie"
    after = kernel.run("%%distributed --targets 1\nimport os\nos.getpid()")
    assert after.error is None, after.error
    pid_after = int(
        after.of_type("display_data")[0]["content"]["data"]["text/plain"].split(": ")[1]
    )
    assert pid_after != pid_before


def test_interrupt_stops_the_engines_and_they_survive(runtime_dir: Path) -> None:
    session = KernelSession(_kernel_env(runtime_dir))
    try:
        _start_cluster(session)
        run = session.run(
            "%%distributed\nimport time\ntime.sleep(60)", timeout_s=30, interrupt_after_s=1.5
        )
        assert run.finished - run.started < 15
        assert run.error is not None
        assert run.error["ename"] == "KeyboardInterrupt"
        assert "Interrupted engines 0, 1" in run.text("stderr")
        after = session.run("%%distributed\n'alive'")
        assert after.error is None
        assert len(after.of_type("display_data")) == 2
    finally:
        session.run("%dist stop")
        session.close()


def test_kernel_restart_reattaches_and_fetches_results(runtime_dir: Path) -> None:
    session = KernelSession(_kernel_env(runtime_dir))
    try:
        _start_cluster(session)
        session.run("%%distributed\nkept = 'namespace survives'")
        submitted = session.run(
            "import time\nf = dist_cluster.submit(lambda: (time.sleep(1), 6 * 7)[1])\nprint(f.id)"
        )
        task_id = submitted.text().strip()
        session.restart()
        loaded = session.run("%load_ext jupyter_dist")
        assert "Reattached to cluster" in loaded.text()
        kept = session.run("%%distributed\nkept")
        assert all(
            o["content"]["data"]["text/plain"].endswith("'namespace survives'")
            for o in kept.of_type("display_data")
        )
        result = session.run(f"%dist results {task_id}")
        assert result.error is None, result.error
        assert result.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "42"
        listing = session.run("%dist results").text()
        assert task_id in listing
        cluster_id = loaded.text().split()[3]
        assert (
            f"Connected to cluster {cluster_id}"
            in session.run(f"%dist connect {cluster_id}").text()
        )
    finally:
        session.run("%dist stop")
        session.close()


def test_long_broadcast_shows_a_progress_bar(kernel: KernelSession) -> None:
    run = kernel.run("%%distributed\nimport time\ntime.sleep(1.6)")
    widgets = [
        o
        for o in run.of_type("display_data")
        if "application/vnd.jupyter.widget-view+json" in o["content"]["data"]
    ]
    assert widgets, "no progress bar for a broadcast longer than a second"
    quick = kernel.run("%%distributed\nNone")
    assert not quick.of_type("display_data")


def test_interrupt_kill_restarts_an_engine_stuck_ignoring_interrupts(kernel: KernelSession) -> None:
    kernel.run(
        "%%distributed --targets 0 --noblock\n"
        "import signal, time\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "time.sleep(60)"
    )
    kernel.run("%dist interrupt 0")
    assert "Killed and restarted engines 0." in kernel.run("%dist interrupt --kill 0").text()
    after = kernel.run("%%distributed --targets 0\n'fresh'")
    assert after.of_type("display_data")[0]["content"]["data"]["text/plain"].endswith("'fresh'")
