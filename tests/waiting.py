"""Wait for a condition, never for a duration (modelled on dask's ``poll_for``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import pytest


def poll_for(
    predicate: Callable[[], object], timeout_s: float, what: str, period_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached after {timeout_s} s")
        time.sleep(period_s)


def wait_for_exit(pids: list[int], timeout_s: float, period_s: float = 0.02) -> list[int]:
    """Wait until each process has exited (a zombie counts as exited); return those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while True:
        alive = [pid for pid in alive if _is_running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(period_s)


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
