"""jupyter-dist under the benchmark: the public API only, as a notebook would call it."""

from __future__ import annotations

import time
from functools import partial

import numpy as np

import jupyter_dist as jd
from benchmarks.figures import Sizes
from benchmarks.measure import (
    Samples,
    import_seconds,
    mb_per_s,
    peer_main,
    rate,
    record,
    record_idle,
    record_starts,
    record_timed_with_cpu,
    run_clusters,
    seconds,
    timed_ms,
)
from benchmarks.peers.torch_worker import START_TIMEOUT_S
from jupyter_dist import connection_file


def noop() -> None:
    return None


def start(n: int) -> tuple[jd.Cluster, float]:
    """Start ``n`` engines; ready means each has run a first task."""
    begin = time.perf_counter()
    c = jd.Cluster.start(n=n, timeout_s=120)
    c.apply(noop)
    return c, time.perf_counter() - begin


def stop(c: jd.Cluster) -> float:
    begin = time.perf_counter()
    c.stop()
    return time.perf_counter() - begin


def small_cluster_figures(c: jd.Cluster, sizes: Sizes, samples: Samples) -> None:
    e0 = c[0]
    reps = sizes.roundtrip_reps
    record_timed_with_cpu(samples, "roundtrip_direct", lambda: e0.apply(noop), reps)
    record(samples, "roundtrip_balanced", timed_ms(lambda: c.submit(noop).result(60), reps))

    def many() -> None:
        for f in [c.submit(noop) for _ in range(sizes.tasks)]:
            f.result(600)

    record(samples, "throughput", rate(many, sizes.tasks, sizes.task_reps))
    record(samples, "broadcast_small", timed_ms(lambda: c.run("a = 1"), sizes.broadcast_reps))

    arr = np.random.default_rng(0).integers(0, 255, sizes.nbytes, dtype=np.uint8)
    reps = sizes.transfer_reps
    record(samples, "push", mb_per_s(lambda: e0.push(x=arr), sizes.nbytes, reps))
    e0.push(y=arr)
    record(samples, "pull", mb_per_s(lambda: e0.pull("y"), sizes.nbytes, reps))
    e0.run("del x, y")
    record(samples, "scatter", mb_per_s(lambda: c.scatter("s", arr), sizes.nbytes, reps))
    record(samples, "gather", mb_per_s(lambda: c.gather("s"), sizes.nbytes, reps))
    c.run("del s")


def large_cluster_figures(c: jd.Cluster, sizes: Sizes, samples: Samples) -> None:
    record_timed_with_cpu(samples, "broadcast_large", lambda: c.run("a = 1"), sizes.broadcast_reps)
    controller = connection_file.read(c.connection_file).controller_pid
    record_idle(samples, sizes, lambda: [e.pid for e in c.status()], lambda: [controller])


def run(sizes: Sizes, samples: Samples) -> None:
    run_clusters(sizes, samples, start, stop, small_cluster_figures, large_cluster_figures)


FIRST_ALL_REDUCE = "import torch, torch.distributed as dist; t = torch.ones(1); dist.all_reduce(t)"


def torch_start(sizes: Sizes, samples: Samples) -> None:
    """From the call to ``Cluster.start(torch=True)`` to the first all_reduce returning on every
    engine, a fresh cluster each time; then the same start step by step on fresh clusters."""
    n = sizes.engines_large
    record(
        samples,
        "torch_import_launcher",
        import_seconds("import jupyter_dist", sizes.torch_start_reps),
    )

    def start_once() -> float:
        begin = time.perf_counter()
        with jd.Cluster.start(n=n, torch=True, timeout_s=START_TIMEOUT_S) as c:  # stops it
            c.run(FIRST_ALL_REDUCE)
            took = time.perf_counter() - begin
            c.run(f"assert t.item() == {n}, t")
        return took

    steps = {
        "torch_step_import": lambda c: c.run("import torch.distributed"),
        "torch_step_group": lambda c: c.torch(),
        "torch_step_all_reduce": lambda c: c.run(FIRST_ALL_REDUCE),
    }

    def start_step_by_step() -> float:
        c, took = start(n)
        with c:
            for key, step in steps.items():
                record(samples, key, seconds(partial(step, c)))
        return took

    record_starts(samples, "torch_start", start_once, sizes.torch_start_reps)
    record_starts(samples, "torch_step_start", start_step_by_step, sizes.torch_start_reps)


if __name__ == "__main__":
    raise SystemExit(peer_main({"core": run, "torch": torch_start}))
