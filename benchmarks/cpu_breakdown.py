"""Where a jupyter-dist call spends its CPU: each thread of the client, controller and engines.

``python -m benchmarks.cpu_breakdown`` runs a direct no-op round trip on one
engine and a broadcast of a tiny statement to 8, and prints, per call, the
CPU time and the wake-ups (scheduler time slices) of every thread that did
work. It reads ``/proc/<pid>/task/<tid>/schedstat`` (Linux). This is the
profile behind the round-trip and broadcast readings in RESULTS.md: on two
cores the processes of one call run mostly one after the other, so their
CPU per call bounds its latency from below.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jupyter_dist as jd
from jupyter_dist import connection_file

# (process label, thread name) -> (CPU ns, time slices)
ThreadTimes = dict[tuple[str, str], tuple[int, int]]


def noop() -> None:
    return None


def thread_times(processes: dict[str, int]) -> ThreadTimes:
    """CPU time and time slices so far of each thread, by process label and thread (name and tid)."""
    out: ThreadTimes = {}
    for label, pid in processes.items():
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
                cpu_ns, _, slices = (task / "schedstat").read_text().split()[:3]
            except OSError:
                continue  # the thread ended meanwhile
            out[(label, f"{name} {task.name}")] = (int(cpu_ns), int(slices))
    return out


def breakdown(processes: dict[str, int], fn: Callable[[], Any], calls: int) -> list[str]:
    """Lines of ``label thread: us of CPU and wake-ups per call`` for the threads ``fn`` kept busy."""
    before = thread_times(processes)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    wall_us = (time.perf_counter() - start) / calls * 1e6
    after = thread_times(processes)
    lines, total_us = [], 0.0
    for key, (cpu_ns, slices) in after.items():
        if key not in before:
            continue
        cpu_us = (cpu_ns - before[key][0]) / calls / 1000
        if cpu_us >= 1:
            total_us += cpu_us
            wakes = (slices - before[key][1]) / calls
            lines.append(f"  {key[0]:<10} {key[1]:<24} {cpu_us:8.1f} us {wakes:6.2f} wake-ups")
    lines.append(
        f"  all threads: {total_us:.0f} us of CPU per call; wall {wall_us:.0f} us per call"
    )
    return lines


def cluster_processes(c: jd.Cluster) -> dict[str, int]:
    info = connection_file.read(c.connection_file)
    processes = {"client": os.getpid(), "controller": info.controller_pid}
    processes.update({f"engine {e.engine_id}": e.pid for e in c.status()})
    return processes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="round trips (broadcasts: a tenth)")
    args = parser.parse_args(argv)
    calls = args.calls
    with jd.Cluster.start(n=1) as c:
        e0 = c[0]
        for _ in range(min(calls, 300)):
            e0.apply(noop)
        print(f"direct no-op round trip, {calls} calls:")
        print("\n".join(breakdown(cluster_processes(c), lambda: e0.apply(noop), calls)))
    with jd.Cluster.start(n=8) as c:
        broadcasts = max(1, calls // 10)
        for _ in range(min(broadcasts, 100)):
            c.run("a = 1")
        print(f"broadcast of 'a = 1' to 8 engines, {broadcasts} calls:")
        print("\n".join(breakdown(cluster_processes(c), lambda: c.run("a = 1"), broadcasts)))


if __name__ == "__main__":
    main()
