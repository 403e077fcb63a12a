"""Ray under the benchmark: ``ray.init`` on this machine, one actor per engine, tasks for balanced work.

Equivalents: a method call on one actor is the direct round trip; a
``@ray.remote`` task is the load-balanced one; the broadcast calls one
method on every actor; push, pull, scatter and gather pass arrays to and
from actors (Ray moves them through its shared-memory object store). The
"controller" is Ray's GCS server plus the raylet.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import numpy as np
import psutil
import ray

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


@ray.remote
def noop() -> None:
    return None


@ray.remote(num_cpus=1)
class Engine:
    """A namespace on one worker, like an engine's."""

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {}

    def noop(self) -> None:
        return None

    def run(self, code: str) -> None:
        exec(code, self.ns)

    def set(self, name: str, value: Any) -> None:
        self.ns[name] = value

    def get(self, name: str) -> Any:
        return self.ns[name]

    def pid(self) -> int:
        return os.getpid()


def start(n: int) -> tuple[list[Any], float]:
    """Start Ray with ``n`` CPUs and ``n`` actors; ready means each has run a first call."""
    if ray.is_initialized():
        ray.shutdown()  # a start that failed half way
    begin = time.perf_counter()
    ray.init(num_cpus=n, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    actors = [Engine.options(num_cpus=0).remote() for _ in range(n)]
    ray.get([a.noop.remote() for a in actors])
    return actors, time.perf_counter() - begin


def stop(actors: list[Any]) -> float:
    begin = time.perf_counter()
    ray.shutdown()
    return time.perf_counter() - begin


def small_cluster_figures(actors: list[Any], sizes: Sizes, samples: Samples) -> None:
    a0 = actors[0]
    reps = sizes.roundtrip_reps
    record_timed_with_cpu(samples, "roundtrip_direct", lambda: ray.get(a0.noop.remote()), reps)
    record(samples, "roundtrip_balanced", timed_ms(lambda: ray.get(noop.remote()), reps))
    record(
        samples,
        "throughput",
        rate(
            lambda: ray.get([noop.remote() for _ in range(sizes.tasks)]),
            sizes.tasks,
            sizes.task_reps,
        ),
    )
    record(
        samples,
        "broadcast_small",
        timed_ms(lambda: ray.get([a.run.remote("a = 1") for a in actors]), sizes.broadcast_reps),
    )
    arr = np.random.default_rng(0).integers(0, 255, sizes.nbytes, dtype=np.uint8)
    reps = sizes.transfer_reps
    record(samples, "push", mb_per_s(lambda: ray.get(a0.set.remote("x", arr)), sizes.nbytes, reps))
    ray.get(a0.set.remote("y", arr))
    record(samples, "pull", mb_per_s(lambda: ray.get(a0.get.remote("y")), sizes.nbytes, reps))
    ray.get(a0.run.remote("del x, y"))
    bounds = np.linspace(0, sizes.nbytes, len(actors) + 1).astype(int)
    chunks = [arr[a:b] for a, b in itertools.pairwise(bounds)]

    def scatter() -> None:
        ray.get([a.set.remote("s", c) for a, c in zip(actors, chunks, strict=True)])

    def gather() -> None:
        np.concatenate(ray.get([a.get.remote("s") for a in actors]))

    record(samples, "scatter", mb_per_s(scatter, sizes.nbytes, reps))
    record(samples, "gather", mb_per_s(gather, sizes.nbytes, reps))


def _controller_pids() -> list[int]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() in ("raylet", "gcs_server"):
                out.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def large_cluster_figures(actors: list[Any], sizes: Sizes, samples: Samples) -> None:
    record_timed_with_cpu(
        samples,
        "broadcast_large",
        lambda: ray.get([a.run.remote("a = 1") for a in actors]),
        sizes.broadcast_reps,
    )
    record_idle(samples, sizes, lambda: ray.get([a.pid.remote() for a in actors]), _controller_pids)


def run(sizes: Sizes, samples: Samples) -> None:
    run_clusters(sizes, samples, start, stop, small_cluster_figures, large_cluster_figures)


if __name__ == "__main__":
    raise SystemExit(peer_main({"core": run}))
