"""Large arrays between the notebook and engines on one host go through shared memory."""

from __future__ import annotations

import os

import numpy as np
import pytest

import jupyter_dist as jd
from jupyter_dist import shm
from tests.waiting import poll_for

NBYTES = 2 * shm.SHM_MIN_NBYTES


def _segments(cluster: jd.Cluster) -> list[str]:
    """The cluster's segments (each engine's start record aside)."""
    prefix = f"jd-{cluster.id}-"
    return [e for e in os.listdir(shm.SHM_DIR) if e.startswith(prefix) and "-started-" not in e]


def test_push_pull_scatter_gather_of_large_arrays_round_trip(cluster: jd.Cluster) -> None:
    arr = np.random.default_rng(1).integers(0, 1000, NBYTES // 8, dtype=np.int64)
    cluster[0].push(big=arr)
    np.testing.assert_array_equal(cluster[0].pull("big"), arr)
    assert cluster[0].run("int(big.sum())") == int(arr.sum())
    cluster.push(everywhere=arr)  # one copy mapped by both engines
    assert cluster.run("int(everywhere[-1])") == [int(arr[-1])] * 2
    cluster.scatter("part", arr)
    np.testing.assert_array_equal(cluster.gather("part"), arr)
    cluster.run("del everywhere, part")
    cluster[0].run("del big")
    # Nothing is left in flight: each segment is mapped (held) or back in the pool.
    poll_for(
        lambda: all(".held" in e or "-free-" in e for e in _segments(cluster)),
        10,
        "no segment in flight",
    )


def test_a_stopped_cluster_leaves_no_shared_memory(fresh_cluster: jd.Cluster) -> None:
    value = fresh_cluster[1].apply(lambda n: np.ones(n, dtype=np.uint8), NBYTES)
    assert value.nbytes == NBYTES
    assert _segments(fresh_cluster)
    fresh_cluster.stop()
    assert _segments(fresh_cluster) == []
    assert int(value.sum()) == NBYTES  # the mapping outlives the file
    del value
    assert _mapped_here(fresh_cluster) == []  # and goes with the last value over it


def _mapped_here(cluster: jd.Cluster) -> list[str]:
    """This process's mappings of the cluster's segments (kept for reuse while their files live)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if f"{shm.SHM_DIR}/jd-{cluster.id}-" in line]


def test_engines_write_large_arrays_of_a_gather_in_place(cluster: jd.Cluster) -> None:
    arr = np.random.default_rng(2).random((NBYTES // 8 + 3, 2))  # rows split unevenly
    cluster.scatter("rows", arr)

    back = cluster.gather("rows")

    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable
    # Newest first: each engine was asked twice (its layout, then its write), after the scatter.
    kinds = [t.kind for t in cluster.history(6)]
    assert kinds == ["pull"] * 4 + ["push"] * 2
    cluster.run("del rows")


@pytest.mark.parametrize(
    "code",
    [
        "part = np.ones(N // 8 // (k + 1), dtype=np.float32 if k else np.float64)",  # dtypes differ
        "part = np.ones(N // 8 if k else 3)",  # one large, one small
    ],
)
def test_a_gather_that_cannot_be_written_in_place_joins_as_numpy_does(
    cluster: jd.Cluster, code: str
) -> None:
    cluster.push(N=NBYTES)
    for k in (0, 1):
        cluster[k].run(f"import numpy as np\nk = {k}\n{code}")
    parts = cluster.pull("part")

    np.testing.assert_array_equal(cluster.gather("part"), np.concatenate(parts))
    cluster.run("del part")


def test_a_gather_of_single_numbers_explains_why_it_cannot_join_them(
    cluster: jd.Cluster,
) -> None:
    cluster.run("import numpy as np\nscalar = np.array(1.0)")
    with pytest.raises(jd.JupyterDistError, match="0-d numpy arrays"):
        cluster.gather("scalar")
    cluster.run("del scalar")
