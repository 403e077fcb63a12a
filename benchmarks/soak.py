"""Load with faults: several clients at once while an engine and a client are SIGKILLed (``make soak``).

``python -m benchmarks.soak`` starts a cluster, then client processes that
each submit ``--tasks`` tasks and ``--actor-calls`` calls to an actor of
their own, all at once. While they run, the last engine is SIGKILLed and
restarted in place (``c.restart``) once a quarter of the work is done,
and the first client is SIGKILLed as soon as the controller has everything
it submitted. Then it checks:

- every task of a surviving client returned exactly once with its own
  value, or failed with ``EngineDiedError`` naming the killed engine;
  each task ran at most once (tasks append their number to a log per
  client), and each one that returned ran exactly once;
- each client's actor calls ran in the order it made them, none lost;
- every result the killed client had not taken in can be fetched with
  ``get_result``, with its own value;
- the controller's memory is back within 20% of its start once every
  result is collected. The start is taken after a warm-up round of the
  same work without faults: the C heap keeps the pages a first burst grew
  it to (see ``controller/memory.py``), and what must not happen is that
  it grows with each round of work.

It prints the figures (tasks/s under load, peak controller RSS, latency
p50/p99 per client) as JSON and exits non-zero if any check failed.
``python -m benchmarks.soak client ...`` is one client (run by the driver).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jupyter_dist as jd
from benchmarks.queued import memory_mb, wait_for
from jupyter_dist import connection_file
from jupyter_dist.controller.tasks import MAX_FINISHED

WAIT_S = 600.0
MEMORY_TOLERANCE = 0.20


def run_task(tag: str, i: int, log_dir: str, gate: str = "") -> tuple[str, int]:
    """One task: leave a trace that it ran (to catch a task run twice), return who asked for what.

    With a ``gate`` (a file), it returns only once the file exists (60 s at most).
    """
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    fd = os.open(os.path.join(log_dir, f"{tag}.ran"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{i}\n".encode())  # one write with O_APPEND: lines never interleave
    finally:
        os.close(fd)
    return tag, i


class Ledger:
    """An actor that counts the calls it received; a caller's n-th call must see n before it."""

    def __init__(self) -> None:
        self.calls = 0

    def call(self, seq: int) -> tuple[int, int]:
        seen, self.calls = self.calls, self.calls + 1
        return seq, seen


# ---- one client -------------------------------------------------------------


def client_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    c = jd.Cluster.connect(args.cluster)
    others = [i for i in c.live_engine_ids() if i != args.victim]
    ledger = c[others].actor(Ledger)  # away from the engine that will be killed
    submitted: dict[str, float] = {}
    finished: dict[str, float] = {}
    # What this client took in, written as it comes: what a SIGKILL cuts short is on disk.
    received = os.open(out / f"{args.tag}.received", os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def on_done(future: Any) -> None:
        finished[future.id] = time.perf_counter()
        os.write(received, f"{future.id}\n".encode())

    tasks, calls = [], []
    every = max(1, args.tasks // max(1, args.actor_calls))
    started = time.perf_counter()
    with open(out / f"{args.tag}.ids", "w") as ids:
        for i in range(args.tasks):
            future = c.submit(run_task, args.tag, i, str(out))
            submitted[future.id] = time.perf_counter()
            future.add_done_callback(on_done)
            tasks.append(future)
            ids.write(f"{future.id} {i}\n")
            if i % every == 0 and len(calls) < args.actor_calls:
                call = ledger.call(len(calls))
                submitted[call.id] = time.perf_counter()
                call.add_done_callback(on_done)
                calls.append(call)
        while len(calls) < args.actor_calls:
            calls.append(ledger.call(len(calls)))
        if args.gate:  # a result that cannot reach this client before it is killed
            gated = c[others].submit(run_task, args.tag, args.tasks, str(out), args.gate)
            ids.write(f"{gated.id} {args.tasks}\n")
    c.status()  # its reply comes after every request sent before it: the controller has them all
    (out / f"{args.tag}.submitted").touch()
    report: dict[str, Any] = {"tag": args.tag, "ok": 0, "died_on": [], "wrong": [], "errors": []}
    for i, future in enumerate(tasks):
        try:
            value = future.result(WAIT_S)
        except jd.EngineDiedError as e:
            report["died_on"].append(e.engine_id)
            continue
        except jd.JupyterDistError as e:
            report["errors"].append(f"task {i}: {type(e).__name__}: {e}")
            continue
        if value == (args.tag, i):
            report["ok"] += 1
        else:
            report["wrong"].append([i, list(value)])
    order = [call.result(WAIT_S) for call in calls]
    report["actor_calls"] = len(order)
    report["actor_order_kept"] = order == [(seq, seq) for seq in range(len(calls))]
    report["elapsed_s"] = time.perf_counter() - started
    latencies = sorted(finished[k] - submitted[k] for k in submitted if k in finished)
    report["latency_ms"] = {
        "p50": 1e3 * latencies[len(latencies) // 2],
        "p99": 1e3 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }
    (out / f"{args.tag}.json").write_text(json.dumps(report))
    ledger.kill()  # actors outlive their client: this one is no longer needed
    c.close()
    return 0


# ---- the driver -------------------------------------------------------------


class PeakSampler:
    """Samples a process's RSS every 50 ms on a thread of its own; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = memory_mb(pid)["rss"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, memory_mb(self.pid)["rss"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def _done_count(c: jd.Cluster) -> int:
    c.status()
    tasks = c.connection.state["tasks"]
    return int(tasks["done"]) + int(tasks["failed"])


def _is_drained(c: jd.Cluster) -> bool:
    c.status()
    return int(c.connection.state["tasks"]["pending"]) == 0


def settled_rss_mb(pid: int, still_s: float = 1.5, timeout_s: float = 15.0) -> float:
    """The RSS once it held still (within 1%) for ``still_s``: the controller gives memory back
    within a second of the work draining."""
    deadline = time.monotonic() + timeout_s
    last = memory_mb(pid)["rss"]
    still_since = time.monotonic()
    while time.monotonic() - still_since < still_s and time.monotonic() < deadline:
        time.sleep(0.1)
        now = memory_mb(pid)["rss"]
        if abs(now - last) > 0.01 * last:
            last, still_since = now, time.monotonic()
    return last


def _ran(out: Path, tag: str) -> Counter[int]:
    path = out / f"{tag}.ran"
    return Counter(int(line) for line in path.read_text().split()) if path.exists() else Counter()


def _check_client(
    report: dict[str, Any], ran: Counter[int], n_tasks: int, victim: int
) -> list[str]:
    tag = report["tag"]
    problems = [f"{tag}: {e}" for e in report["errors"]]
    if report["wrong"]:
        problems.append(f"{tag}: {len(report['wrong'])} results of another task or client")
    if report["ok"] + len(report["died_on"]) != n_tasks:
        problems.append(f"{tag}: {report['ok']} ok + {len(report['died_on'])} died != {n_tasks}")
    if any(engine != victim for engine in report["died_on"]):
        problems.append(f"{tag}: EngineDiedError from engines {set(report['died_on'])}")
    if any(count > 1 for count in ran.values()):
        problems.append(f"{tag}: tasks ran twice: {[i for i, n in ran.items() if n > 1][:10]}")
    if report["ok"] > sum(1 for count in ran.values() if count == 1):
        problems.append(f"{tag}: more results than tasks that ran")
    if not report["actor_order_kept"]:
        problems.append(f"{tag}: actor calls out of order or lost")
    return problems


def _fetch_killed_client_results(
    c: jd.Cluster, out: Path, tag: str, victim: int
) -> tuple[int, list[str]]:
    """Every result the killed client had not taken in is still there, with its own value."""
    problems = []
    fetched = 0
    received = set((out / f"{tag}.received").read_text().split())
    for line in (out / f"{tag}.ids").read_text().splitlines():
        task_id, i = line.split()
        if task_id in received:
            continue  # delivered: kept only while the history has room
        try:
            value = c.get_result(task_id, timeout_s=60)
        except jd.EngineDiedError as e:
            if e.engine_id != victim:
                problems.append(f"{tag}: task {i} died on engine {e.engine_id}")
            continue
        except jd.JupyterDistError as e:
            problems.append(f"{tag}: task {i} cannot be fetched: {e}")
            continue
        if value != (tag, int(i)):
            problems.append(f"{tag}: task {i} fetched {value!r}")
        fetched += 1
    return fetched, problems


def _start_clients(
    c: jd.Cluster, args: argparse.Namespace, out: Path, n_tasks: int, gate: str = ""
) -> dict[str, Any]:
    """Start the clients; the first one's last task waits for ``gate`` (if given)."""
    out.mkdir()
    options = ["--tasks", str(n_tasks), "--actor-calls", str(args.actor_calls)]
    options += ["--victim", str(args.engines - 1), "--out", str(out)]
    module = [sys.executable, "-m", "benchmarks.soak", "client", c.id]
    return {
        f"client{k}": subprocess.Popen(
            [*module, f"client{k}", *options, *(["--gate", gate] if k == 0 and gate else [])]
        )
        for k in range(args.clients)
    }


def _reports(
    clients: dict[str, Any], out: Path, n_tasks: int, victim: int
) -> tuple[list[Any], list[str]]:
    """Each surviving client's report, checked."""
    reports, problems = [], []
    for tag, proc in clients.items():
        path = out / f"{tag}.json"
        if proc.returncode != 0 or not path.exists():
            problems.append(f"{tag} exited with {proc.returncode}")
            continue
        report = json.loads(path.read_text())
        reports.append(report)
        problems += _check_client(report, _ran(out, tag), n_tasks, victim)
    return reports, problems


def _end_all(clients: dict[str, Any]) -> None:
    for proc in clients.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def warm_up(c: jd.Cluster, args: argparse.Namespace, out: Path) -> list[str]:
    """The same work without faults, so the memory measured after it is the controller's steady state.

    At least enough tasks to fill the controller's history (``MAX_FINISHED``
    finished tasks are kept after their results were collected): until it
    is full, memory grows with it by design.
    """
    n_tasks = max(args.tasks, MAX_FINISHED // args.clients + 1)
    clients = _start_clients(c, args, out, n_tasks)
    try:
        for proc in clients.values():
            proc.wait(WAIT_S)
    finally:
        _end_all(clients)
    _, problems = _reports(clients, out, n_tasks, args.engines - 1)
    return [f"warm-up: {p}" for p in problems]


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak on a fresh cluster; return its figures and the problems found."""
    out = Path(tempfile.mkdtemp(prefix="jd-soak-"))
    victim = args.engines - 1
    with jd.Cluster.start(n=args.engines, timeout_s=120) as c:
        pid = connection_file.read(c.connection_file).controller_pid
        cold_mb = memory_mb(pid)["rss"]
        problems = warm_up(c, args, out / "warm-up")
        wait_for(lambda: _is_drained(c), "the warm-up's work drained", 60)
        start_mb = settled_rss_mb(pid)
        sampler = PeakSampler(pid)
        before = _done_count(c)
        gate = out / "gate"  # the killed client's last task ends only after it died
        clients = _start_clients(c, args, out / "faults", args.tasks, str(gate))
        doomed_tag, *surviving = list(clients)
        total = args.clients * (args.tasks + args.actor_calls)
        began = time.perf_counter()
        try:
            # The client dies once the controller has all it sent, most of it not run yet.
            wait_for(
                lambda: (out / "faults" / f"{doomed_tag}.submitted").exists(),
                "all submitted",
                WAIT_S,
            )
            clients[doomed_tag].send_signal(signal.SIGKILL)
            clients[doomed_tag].wait()
            gate.touch()
            wait_for(
                lambda: _done_count(c) - before >= total // 4, "a quarter of the work done", WAIT_S
            )
            engine = next(e for e in c.status() if e.engine_id == victim)
            os.kill(engine.pid, signal.SIGKILL)
            wait_for(lambda: victim not in c.live_engine_ids(), f"engine {victim} seen dead", 30)
            c.restart([victim])
            for tag in surviving:
                clients[tag].wait(WAIT_S)
            elapsed_s = time.perf_counter() - began
        finally:
            _end_all(clients)
        survivors = {t: clients[t] for t in surviving}
        reports, more = _reports(survivors, out / "faults", args.tasks, victim)
        problems += more
        fetched, more = _fetch_killed_client_results(c, out / "faults", doomed_tag, victim)
        problems += more
        peak_mb = sampler.stop()
        wait_for(lambda: _is_drained(c), "every task finished", 60)
        end_mb = settled_rss_mb(pid)
        if end_mb > start_mb * (1 + MEMORY_TOLERANCE):
            problems.append(
                f"controller RSS {end_mb:.0f} MB after the results were collected, "
                f"over {start_mb:.0f} MB at the start + {MEMORY_TOLERANCE:.0%}"
            )
    return {
        "clients": args.clients,
        "engines": args.engines,
        "tasks_per_client": args.tasks,
        "actor_calls_per_client": args.actor_calls,
        "tasks_per_s": total / elapsed_s,
        "elapsed_s": elapsed_s,
        "controller_rss_cold_mb": cold_mb,
        "controller_rss_start_mb": start_mb,
        "controller_rss_peak_mb": peak_mb,
        "controller_rss_end_mb": end_mb,
        "latency_ms": {r["tag"]: r["latency_ms"] for r in reports},
        "died_on_killed_engine": sum(len(r["died_on"]) for r in reports),
        "killed_client_results_fetched": fetched,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    client = sub.add_parser("client", help="one client (run by the driver)")
    client.add_argument("cluster")
    client.add_argument("tag")
    client.add_argument("--out", required=True)
    client.add_argument("--victim", type=int, required=True)
    client.add_argument("--gate", default="", help="a file the last task waits for")
    for p in (parser, client):
        p.add_argument("--tasks", type=int, default=10_000)
        p.add_argument("--actor-calls", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--engines", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "client":
        return client_main(args)
    figures = drive(args)
    print(json.dumps(figures, indent=1))
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
