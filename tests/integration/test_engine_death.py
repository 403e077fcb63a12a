"""A killed engine's queued tasks move to other engines only if it never started them."""

from __future__ import annotations

from pathlib import Path

import pytest

import jupyter_dist as jd
from tests.waiting import poll_for


def test_a_task_the_killed_engine_had_started_is_not_run_again(
    fresh_cluster: jd.Cluster, tmp_path: Path
) -> None:
    c = fresh_cluster
    gate, log = str(tmp_path / "gate"), str(tmp_path / "ran")

    def first(gate: str) -> str:
        import os
        import sys
        import time

        while not os.path.exists(gate):
            time.sleep(0.01)
        # The I/O thread gets the GIL back only when the main thread blocks: this task's
        # reply stays in the engine while the next task starts, as when replies lag.
        sys.setswitchinterval(60)
        return "first"

    def second(log: str, victim_pid: int) -> str:
        import os
        import signal

        if os.getpid() == victim_pid:
            os.kill(os.getpid(), signal.SIGKILL)  # holds the GIL: the reply of `first` is not out
        with open(log, "a") as f:
            f.write("second\n")  # runs only if it was moved to another engine
        return "second"

    def third(log: str) -> str:
        with open(log, "a") as f:
            f.write("third\n")
        return "third"

    # Engine 0 is kept busy, so the three balanced tasks all queue on engine 1.
    hold = c[0].run(
        f"import os, time\nwhile not os.path.exists({gate!r}): time.sleep(0.01)", block=False
    )
    fillers = [c[0].apply(abs, -1, block=False) for _ in range(3)]
    futures = [
        c.submit(first, gate),
        c.submit(second, log, c.status()[1].pid),
        c.submit(third, log),
    ]
    poll_for(lambda: c.status()[1].queued == 2, 10, "three tasks on engine 1")
    Path(gate).touch()
    with pytest.raises(jd.EngineDiedError) as died:
        futures[1].result(timeout=20)
    assert died.value.engine_id == 1
    assert futures[2].result(timeout=20) == "third"  # never started there: it moved
    assert Path(log).read_text().split() == ["third"]
    assert hold.result(timeout=20) is None
    assert [f.result(timeout=20) for f in fillers] == [1, 1, 1]
