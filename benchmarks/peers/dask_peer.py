"""Dask under the benchmark: ``LocalCluster`` with one single-threaded worker process per engine.

Equivalents: a task pinned to one worker (``workers=[addr]``) is the direct
round trip; ``client.run`` is the broadcast; push is ``client.scatter`` to
one worker, pull is ``client.gather`` of data made there; scatter and
gather split the array in balanced chunks, one per worker. The scheduler
runs in this process (LocalCluster's default), so there is no controller
process to measure.
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
from dask.distributed import Client, LocalCluster

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


def tiny_statement() -> None:
    exec("a = 1", {})


Handle = tuple[LocalCluster, Client]


def start(n: int) -> tuple[Handle, float]:
    """Start ``n`` workers; ready means each has run a first task."""
    begin = time.perf_counter()
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    client.wait_for_workers(n, timeout=120)
    client.run(noop)
    return (cluster, client), time.perf_counter() - begin


def stop(handle: Handle) -> float:
    begin = time.perf_counter()
    cluster, client = handle
    client.close()
    cluster.close()
    return time.perf_counter() - begin


def small_cluster_figures(handle: Handle, sizes: Sizes, samples: Samples) -> None:
    client = handle[1]
    workers = sorted(client.scheduler_info()["workers"])
    w0 = workers[0]
    reps = sizes.roundtrip_reps
    record_timed_with_cpu(
        samples,
        "roundtrip_direct",
        lambda: client.submit(noop, pure=False, workers=[w0]).result(60),
        reps,
    )
    record(
        samples,
        "roundtrip_balanced",
        timed_ms(lambda: client.submit(noop, pure=False).result(60), reps),
    )

    def many() -> None:
        client.gather([client.submit(noop, pure=False) for _ in range(sizes.tasks)])

    record(samples, "throughput", rate(many, sizes.tasks, sizes.task_reps))
    record(
        samples,
        "broadcast_small",
        timed_ms(lambda: client.run(tiny_statement), sizes.broadcast_reps),
    )

    arr = np.random.default_rng(0).integers(0, 255, sizes.nbytes, dtype=np.uint8)
    reps = sizes.transfer_reps

    def push() -> None:
        future = client.scatter(arr, workers=[w0], direct=True, hash=False)
        future.release()

    record(samples, "push", mb_per_s(push, sizes.nbytes, reps))
    on_worker = client.scatter(arr, workers=[w0], direct=True, hash=False)
    record(samples, "pull", mb_per_s(on_worker.result, sizes.nbytes, reps))
    on_worker.release()
    bounds = np.linspace(0, sizes.nbytes, len(workers) + 1).astype(int)
    chunks = [arr[a:b] for a, b in itertools.pairwise(bounds)]
    kept: list = []

    def scatter() -> None:
        kept.clear()
        kept.extend(
            client.scatter(chunk, workers=[w], direct=True, hash=False)
            for chunk, w in zip(chunks, workers, strict=True)
        )

    record(samples, "scatter", mb_per_s(scatter, sizes.nbytes, reps))
    record(
        samples,
        "gather",
        mb_per_s(lambda: np.concatenate(client.gather(kept, direct=True)), sizes.nbytes, reps),
    )
    kept.clear()


def large_cluster_figures(handle: Handle, sizes: Sizes, samples: Samples) -> None:
    client = handle[1]
    record_timed_with_cpu(
        samples, "broadcast_large", lambda: client.run(tiny_statement), sizes.broadcast_reps
    )
    record_idle(samples, sizes, lambda: client.run(os.getpid).values(), None)


def run(sizes: Sizes, samples: Samples) -> None:
    run_clusters(sizes, samples, start, stop, small_cluster_figures, large_cluster_figures)


if __name__ == "__main__":
    raise SystemExit(peer_main({"core": run}))
