"""A full queue: 100,000 tasks wait in the controller, all complete, and its memory stays bounded."""

from __future__ import annotations

import pytest

import jupyter_dist as jd
from benchmarks.queued import measure

N_TASKS = 100_000
# Measured 356 MB while queued and 370 MB at the peak (benchmarks/RESULTS.md); 1 GB fails.
PEAK_RSS_BOUND_MB = 1_000


@pytest.mark.timeout(600)  # about 30 s alone; minutes on a loaded 2-core machine
def test_hundred_thousand_queued_tasks_all_complete_in_bounded_controller_memory(
    fresh_cluster: jd.Cluster,
) -> None:
    figures = measure(fresh_cluster, N_TASKS)  # checks that the results add up
    assert figures["queued_at_once"] >= N_TASKS - 64 * 2
    assert figures["peak_rss_mb"] < PEAK_RSS_BOUND_MB, figures
