"""Tasks submitted with ``retries`` run again on another engine when theirs dies, never on user errors."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

import jupyter_dist as jd
from tests.waiting import poll_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # engines cannot import tests


def _runs(log: Path) -> list[int]:
    """The pids of the engines that started the task, one line each."""
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def _note_run_then(log: Path, first_run: str) -> int:
    """Note this engine's pid; on the first run, then sleep ("sleep") or die ("die")."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    if len(log.read_text().split()) == 1:
        if first_run == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    return os.getpid()


def _raise_once_noted(log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("user code failed")


def test_a_task_whose_engine_dies_runs_again_elsewhere_but_user_errors_never_do(
    fresh_cluster: jd.Cluster, tmp_path: Path
) -> None:
    c = fresh_cluster
    raised = tmp_path / "raised"
    with pytest.raises(jd.RemoteError, match="user code failed"):
        c.submit(_raise_once_noted, raised, retries=2).result(timeout=10)
    assert len(_runs(raised)) == 1

    log = tmp_path / "runs"
    future = c.submit(_note_run_then, log, "sleep", retries=2)
    poll_for(lambda: len(_runs(log)) == 1, 10, "the first run started")
    os.kill(_runs(log)[0], signal.SIGKILL)
    second_pid = future.result(timeout=20)
    first_pid, noted_second = _runs(log)
    assert second_pid == noted_second != first_pid


def test_the_last_error_names_every_engine_the_task_died_on(
    fresh_cluster: jd.Cluster, tmp_path: Path
) -> None:
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(jd.EngineDiedError) as caught:
        fresh_cluster.submit(die, retries=1).result(timeout=20)
    assert sorted(caught.value.died_on) == [0, 1]
    assert "It was tried 2 times; the engines it died on: " in str(caught.value)


def test_map_with_retries_returns_every_result_when_an_engine_dies(
    fresh_cluster: jd.Cluster, tmp_path: Path
) -> None:
    log = tmp_path / "runs"

    def square(x: int) -> int:
        if x == 7:
            _note_run_then(log, "die")
        return x * x

    assert fresh_cluster.map(square, range(20), retries=1) == [x * x for x in range(20)]
    assert len(_runs(log)) == 2


def test_retries_must_be_a_whole_number(cluster: jd.Cluster) -> None:
    with pytest.raises(ValueError, match="retries must be a whole number of 0 or more, not -1"):
        cluster.submit(abs, 1, retries=-1)
