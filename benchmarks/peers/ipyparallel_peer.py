"""ipyparallel under the benchmark: ``ipp.Cluster`` with local engines, direct and load-balanced views."""

from __future__ import annotations

import os
import time

import ipyparallel as ipp
import numpy as np
import psutil

from benchmarks.figures import Sizes
from benchmarks.measure import (
    Samples,
    mb_per_s,
    peer_main,
    rate,
    record,
    record_idle,
    record_timed_with_cpu,
    run_clusters,
    timed_ms,
)


def noop() -> None:
    return None


Handle = tuple[ipp.Cluster, ipp.Client]


def start(n: int) -> tuple[Handle, float]:
    """Start a controller and ``n`` engines; ready means each has run a first task."""
    begin = time.perf_counter()
    cluster = ipp.Cluster(n=n, log_level=40)
    rc = cluster.start_and_connect_sync()
    rc.wait_for_engines(n, timeout=120)
    rc[:].apply_sync(noop)
    return (cluster, rc), time.perf_counter() - begin


def stop(handle: Handle) -> float:
    begin = time.perf_counter()
    cluster, rc = handle
    rc.close()
    cluster.stop_cluster_sync()
    return time.perf_counter() - begin


def small_cluster_figures(handle: Handle, sizes: Sizes, samples: Samples) -> None:
    rc = handle[1]
    e0 = rc[0]
    lview = rc.load_balanced_view()
    reps = sizes.roundtrip_reps
    record_timed_with_cpu(samples, "roundtrip_direct", lambda: e0.apply_sync(noop), reps)
    record(samples, "roundtrip_balanced", timed_ms(lambda: lview.apply_sync(noop), reps))

    def many() -> None:
        results = [lview.apply_async(noop) for _ in range(sizes.tasks)]
        for r in results:
            r.get(600)

    record(samples, "throughput", rate(many, sizes.tasks, sizes.task_reps))
    everyone = rc[:]
    record(
        samples,
        "broadcast_small",
        timed_ms(lambda: everyone.execute("a = 1", block=True), sizes.broadcast_reps),
    )
    arr = np.random.default_rng(0).integers(0, 255, sizes.nbytes, dtype=np.uint8)
    reps = sizes.transfer_reps
    record(samples, "push", mb_per_s(lambda: e0.push({"x": arr}, block=True), sizes.nbytes, reps))
    e0.push({"y": arr}, block=True)
    record(samples, "pull", mb_per_s(lambda: e0.pull("y", block=True), sizes.nbytes, reps))
    e0.execute("del x, y", block=True)
    record(
        samples,
        "scatter",
        mb_per_s(lambda: everyone.scatter("s", arr, block=True), sizes.nbytes, reps),
    )
    record(
        samples, "gather", mb_per_s(lambda: everyone.gather("s", block=True), sizes.nbytes, reps)
    )
    everyone.execute("del s", block=True)


def _controller_pids(engine_pids: set[int]) -> list[int]:
    me = psutil.Process()
    out = []
    for proc in me.children(recursive=True):
        if proc.pid in engine_pids:
            continue
        try:
            if "controller" in " ".join(proc.cmdline()):
                out.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def large_cluster_figures(handle: Handle, sizes: Sizes, samples: Samples) -> None:
    everyone = handle[1][:]
    record_timed_with_cpu(
        samples,
        "broadcast_large",
        lambda: everyone.execute("a = 1", block=True),
        sizes.broadcast_reps,
    )
    engine_pids = set(everyone.apply_sync(os.getpid))
    record_idle(samples, sizes, lambda: engine_pids, lambda: _controller_pids(engine_pids))


def run(sizes: Sizes, samples: Samples) -> None:
    run_clusters(sizes, samples, start, stop, small_cluster_figures, large_cluster_figures)


if __name__ == "__main__":
    raise SystemExit(peer_main({"core": run}))
