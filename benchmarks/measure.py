"""Timing, memory and CPU measurements shared by the peers, and the peers' command line.

Every peer module calls ``peer_main({group: run, ...})`` with a function
for each group of figures it measures (``core``, ``torch``): it parses
``--out FILE``, ``--quick`` and ``--figures GROUPS``, calls ``run(sizes,
samples)`` of each group asked for and writes the samples it collected as
JSON, also when a figure fails half way (the parent shows what came back
and n/a for the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from benchmarks.figures import MB, Sizes

Samples = dict[str, list[float]]


def _seconds_each(fn: Callable[[], Any], reps: int, warmup: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def seconds(fn: Callable[[], Any]) -> float:
    """Seconds of one call of ``fn``, for what can only be done once (a start, a first import)."""
    return _seconds_each(fn, reps=1, warmup=0)[0]


def import_seconds(statement: str, reps: int) -> list[float]:
    """Seconds ``statement`` (an import) takes in each of ``reps`` fresh interpreters,
    not counting the interpreter's own start."""
    timed = f"import time; b = time.perf_counter(); {statement}; print(time.perf_counter() - b)"
    return [
        float(
            subprocess.run(
                [sys.executable, "-c", timed], capture_output=True, check=True, text=True
            ).stdout
        )
        for _ in range(reps)
    ]


def record_starts(samples: Samples, key: str, start_once: Callable[[], float], reps: int) -> None:
    """Record the seconds ``start_once()`` returns for each of ``reps`` starts as ``key``,
    and as ``key_failed`` how many raised (failed, or hung past their timeout).

    A failed start says why on stderr and is left out of the times, so one
    hiccup of a loaded machine shows in its own row instead of blanking the figure.
    """
    failed = 0
    for _ in range(reps):
        try:
            record(samples, key, start_once())
        except Exception:
            failed += 1
            print(f"  a start failed ({key}):\n{traceback.format_exc()}", file=sys.stderr)
    record(samples, f"{key}_failed", float(failed))


def run_to_end(name: str, cmd: list[str], timeout_s: float) -> None:
    """Run ``cmd`` (``name`` in messages) with its output captured; on a non-zero exit, or
    past ``timeout_s``, raise with its output's end. Every process it started (its
    session) ends with it."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        outcome = f"exited {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        outcome = f"hung for {timeout_s:.0f} s"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what it left behind, if anything
    if outcome != "exited 0":
        raise RuntimeError(f"{name} {outcome}; its output ended:\n{output[-3000:]}")


def timed_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    return [s * 1000 for s in _seconds_each(fn, reps, warmup)]


def rate(fn: Callable[[], Any], amount: float, reps: int, warmup: int = 1) -> list[float]:
    """``amount`` per second (MB/s, tasks/s) of each of ``reps`` calls of ``fn``."""
    return [amount / s for s in _seconds_each(fn, reps, warmup)]


def mb_per_s(fn: Callable[[], Any], nbytes: int, reps: int, warmup: int = 1) -> list[float]:
    return rate(fn, nbytes / MB, reps, warmup)


def memory_mb(pids: Iterable[int]) -> tuple[list[float], list[float]]:
    """RSS and USS (memory only this process holds), in MB, of each pid that still runs."""
    rss, uss = [], []
    for pid in pids:
        try:
            full = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss.append(full.rss / MB)
        uss.append(full.uss / MB)
    return rss, uss


def record_idle(
    samples: Samples,
    sizes: Sizes,
    engine_pids: Callable[[], Iterable[int]],
    controller_pids: Callable[[], Iterable[int]] | None,
) -> None:
    """Let the cluster settle, then record its idle CPU and its engines' and controller's memory.

    A controller made of several processes (Ray's) counts as their sum;
    ``controller_pids=None`` means there is no controller process to measure.
    """
    time.sleep(sizes.settle_s)
    record(samples, "idle_cpu", idle_cpu_percent(sizes.idle_window_s))
    rss, uss = memory_mb(engine_pids())
    record(samples, "engine_rss", rss)
    record(samples, "engine_uss", uss)
    if controller_pids is not None:
        rss, uss = memory_mb(controller_pids())
        if rss:
            record(samples, "controller_rss", sum(rss))
            record(samples, "controller_uss", sum(uss))


def tree_pids() -> list[int]:
    """This process and all its descendants: the whole cluster when this process started it."""
    me = psutil.Process()
    return [me.pid, *(p.pid for p in me.children(recursive=True))]


def _schedstat_seconds(pid: int) -> float | None:
    """CPU time of all threads of ``pid`` in ns resolution (Linux), or None where unreadable.

    ``cpu_times()`` counts in 10 ms ticks: over a 5 s window that is 0.2 % of
    a core per process, as large as what is being measured.
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def _cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        seconds = _schedstat_seconds(pid)
        if seconds is None:
            try:
                times = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            seconds = times.user + times.system
        out[pid] = seconds
    return out


def _tree_cpu_seconds_during(fn: Callable[[], Any]) -> float:
    """CPU seconds this process and its descendants (the whole cluster) spend while ``fn`` runs."""
    pids = tree_pids()
    before = _cpu_seconds(pids)
    fn()
    after = _cpu_seconds(pids)
    return sum(after[pid] - before[pid] for pid in after if pid in before)


def idle_cpu_percent(window_s: float) -> float:
    """CPU used by this process and its descendants over ``window_s`` idle seconds, in % of one core."""
    start = time.perf_counter()
    used = _tree_cpu_seconds_during(lambda: time.sleep(window_s))
    return 100.0 * used / (time.perf_counter() - start)


def record_timed_with_cpu(
    samples: Samples, key: str, fn: Callable[[], Any], reps: int, warmup: int = 2
) -> None:
    """Record each call's milliseconds as ``key``, and as ``key_cpu`` the CPU milliseconds
    that all the cluster's processes spent per call over the same calls.

    On two cores a round trip's processes mostly run one after the other, so
    its latency is bounded below by the CPU they spend on it.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    used_s = _tree_cpu_seconds_during(lambda: times.extend(timed_ms(fn, reps, warmup=0)))
    record(samples, key, times)
    record(samples, f"{key}_cpu", 1000.0 * used_s / reps)


def record(samples: Samples, key: str, values: list[float] | float) -> None:
    """Add samples of a figure and say so on stderr (the parent shows progress from it)."""
    values = values if isinstance(values, list) else [values]
    samples.setdefault(key, []).extend(values)
    print(f"  {key}: {', '.join(f'{v:.4g}' for v in values[:8])}", file=sys.stderr, flush=True)


def run_clusters(
    sizes: Sizes,
    samples: Samples,
    start: Callable[[int], tuple[Any, float]],
    stop: Callable[[Any], float],
    small_figures: Callable[[Any, Sizes, Samples], None],
    large_figures: Callable[[Any, Sizes, Samples], None],
) -> None:
    """The same schedule for every peer: start and stop clusters, measure on a small and a large one.

    ``start(n)`` returns a handle and the seconds until all ``n`` engines
    ran a first task; ``stop(handle)`` the seconds to end the cluster.
    """

    def start_once_more_if_it_fails(n: int) -> tuple[Any, float]:
        # A loaded 2-core machine makes a peer's start time out now and then (Ray's
        # raylet); one more try keeps one hiccup from blanking all of its figures.
        try:
            return start(n)
        except Exception:
            print(f"  start of {n} engines failed; trying once more", file=sys.stderr)
            traceback.print_exc()
            return start(n)

    for _ in range(sizes.startup_reps - 1):
        for key, n in (("small", sizes.engines_small), ("large", sizes.engines_large)):
            handle, took = start_once_more_if_it_fails(n)
            record(samples, f"startup_{key}", took)
            record(samples, f"stop_{key}", stop(handle))
    for key, n, figures in (
        ("small", sizes.engines_small, small_figures),
        ("large", sizes.engines_large, large_figures),
    ):
        handle, took = start_once_more_if_it_fails(n)
        record(samples, f"startup_{key}", took)
        figures(handle, sizes, samples)
        record(samples, f"stop_{key}", stop(handle))


def peer_main(groups: dict[str, Callable[[Sizes, Samples], None]]) -> int:
    """Run one peer's figures and write ``{"samples": ..., "error": ..., "pid": ...}``.

    ``--figures core,torch`` picks the groups (all of this peer's by default);
    a group this peer does not measure is skipped, and one that fails does
    not keep the next from running.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--figures", default=",".join(groups))
    args = parser.parse_args()
    sizes = Sizes.quick() if args.quick else Sizes()
    samples: Samples = {}
    error = ""
    for name in args.figures.split(","):
        if name not in groups:
            continue
        try:
            groups[name](sizes, samples)
        except Exception:
            failed = traceback.format_exc()
            print(failed, file=sys.stderr)
            error += failed
    with open(args.out, "w") as f:
        json.dump({"samples": samples, "error": error, "pid": os.getpid()}, f)
    return 1 if error else 0
