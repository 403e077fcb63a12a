"""The controller's memory with 100,000 tasks queued in it: ``python -m benchmarks.queued``.

Every engine is held busy by a cell that waits for a file, so the tasks
submitted meanwhile stay queued in the controller (all but the few each
engine takes ahead). Its resident memory is read before, once all of them
are queued, and at its peak (the kernel's high-water mark, ``VmHWM``) after
they all ran; then the results are checked.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import jupyter_dist as jd
from jupyter_dist import connection_file

WAIT_S = 600.0


def memory_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now (``rss``) and at its peak so far (``peak``), in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / 1e6
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def wait_for(predicate: Any, what: str, timeout_s: float) -> None:
    """Wait until ``predicate()`` holds, or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout_s} s")
        time.sleep(0.05)


def _queued(c: jd.Cluster) -> int:
    c.status()
    return int(c.connection.state["tasks"]["queued"])


def measure(c: jd.Cluster, n_tasks: int) -> dict[str, Any]:
    """Queue ``n_tasks`` no-op tasks behind busy engines, let them run; figures in MB and s."""
    pid = connection_file.read(c.connection_file).controller_pid
    n_engines = len(c.live_engine_ids())
    before = memory_mb(pid)
    with tempfile.TemporaryDirectory() as tmp:
        gate = Path(tmp) / "go"
        hold = c.run(
            f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)",
            block=False,
        )
        started = time.perf_counter()
        futures = c.map(abs, range(-n_tasks, 0), block=False)
        submitted_s = time.perf_counter() - started
        # Each engine takes a pipeline's worth ahead; the rest waits in the controller.
        wait_for(lambda: _queued(c) >= n_tasks - 64 * n_engines, "all tasks queued", WAIT_S)
        queued_s = time.perf_counter() - started
        queued = _queued(c)
        while_queued = memory_mb(pid)
        gate.touch()
        hold.result(WAIT_S)
        ran_from = time.perf_counter()
        total = sum(f.result(WAIT_S) for f in futures)
        ran_s = time.perf_counter() - ran_from
    after = memory_mb(pid)
    if total != n_tasks * (n_tasks + 1) // 2:
        raise AssertionError(f"the {n_tasks} results add up to {total}")
    return {
        "tasks": n_tasks,
        "engines": n_engines,
        "queued_at_once": queued,
        "submit_s": submitted_s,
        "all_queued_s": queued_s,
        "run_s": ran_s,
        "rss_before_mb": before["rss"],
        "rss_queued_mb": while_queued["rss"],
        "rss_after_mb": after["rss"],
        "peak_rss_mb": after["peak"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--engines", type=int, default=2)
    args = parser.parse_args(argv)
    with jd.Cluster.start(n=args.engines, timeout_s=120) as c:
        figures = measure(c, args.tasks)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
