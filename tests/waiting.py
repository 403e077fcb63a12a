"""Wait for a condition, never for a duration (modelled on dask's ``poll_for``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def poll_for(
    predicate: Callable[[], object], timeout_s: float, what: str, period_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached after {timeout_s} s")
        time.sleep(period_s)
