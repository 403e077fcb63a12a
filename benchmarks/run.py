"""Run every peer in a child process of its own, then print the tables with ratios.

``python -m benchmarks`` (what ``make bench`` runs) measures jupyter-dist,
ipyparallel, Dask, Ray, torchrun, accelerate and the floors in one go and
prints a table for each group of figures; ``--figures`` picks groups
(``core``, ``torch``), ``--peers`` picks peers, ``--quick`` runs each figure
once with tiny sizes (the smoke test), and ``--json`` keeps the raw
samples. A peer that is not installed, fails or runs past ``--timeout``
shows as n/a; the run goes on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.figures import GROUPS, PEERS, Sizes, table

# peer -> (module run in the child, the package it needs)
MODULES = {
    "jupyter_dist": ("benchmarks.peers.jupyter_dist_peer", "jupyter_dist"),
    "ipyparallel": ("benchmarks.peers.ipyparallel_peer", "ipyparallel"),
    "dask": ("benchmarks.peers.dask_peer", "distributed"),
    "ray": ("benchmarks.peers.ray_peer", "ray"),
    "torchrun": ("benchmarks.peers.torchrun_peer", "torch"),
    "accelerate": ("benchmarks.peers.accelerate_peer", "accelerate"),
    "floors": ("benchmarks.peers.floors", "zmq"),
}
ROOT = Path(__file__).resolve().parent.parent


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """Cores, Python and the versions of everything measured."""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            d: _version(d)
            for d in (
                *("jupyter-dist", "ipyparallel", "dask", "distributed", "ray"),
                *("torch", "accelerate", "pyzmq", "numpy"),
            )
        },
    }


def run_peer(peer: str, groups: list[str], quick: bool, timeout_s: float) -> dict[str, Any]:
    """Run one peer's module on ``groups`` in a fresh interpreter; return its samples
    (empty on failure)."""
    module, package = MODULES[peer]
    if importlib.util.find_spec(package) is None:
        return {"samples": {}, "error": f"{peer} is not installed (make bench installs it)"}
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp:
        out = Path(tmp) / "samples.json"
        cmd = [sys.executable, "-m", module, "--out", str(out), "--figures", ",".join(groups)]
        cmd += ["--quick"] if quick else []
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": tmp, "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        print(f"== {peer}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, timeout=timeout_s, check=False)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        took = time.perf_counter() - started
        print(f"== {peer}: exit {code} after {took:.0f} s", file=sys.stderr, flush=True)
        if not out.exists():
            return {"samples": {}, "error": f"{peer} exited {code} without results"}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--figures", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--peers", help="comma-separated subset (default: all of those groups)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, each figure once")
    parser.add_argument("--json", help="write raw samples and the machine here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per peer")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.figures.split(",") if g.strip()]
    if set(groups) - set(GROUPS):
        parser.error(
            f"unknown figures {sorted(set(groups) - set(GROUPS))}; choose from {list(GROUPS)}"
        )
    in_groups = [p for p in PEERS if any(p in GROUPS[g].peers for g in groups)]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else in_groups
    if set(peers) - set(in_groups):
        parser.error(
            f"peers {sorted(set(peers) - set(in_groups))} measure none of the figures {groups}; "
            f"choose from {in_groups}"
        )
    sizes = Sizes.quick() if args.quick else Sizes()
    results: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, str] = {}
    for peer in peers:
        outcome = run_peer(
            peer, [g for g in groups if peer in GROUPS[g].peers], args.quick, args.timeout
        )
        results[peer] = outcome["samples"]
        if outcome.get("error"):
            errors[peer] = outcome["error"]
    info = machine()
    for name in groups:
        print(f"\n{GROUPS[name].title} (--figures {name}):\n")
        print(table(GROUPS[name], sizes, results))
    print()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"{info['cores']} cores, Python {info['python']}, {info['platform']}; {versions}")
    print(
        "Cells: median (min-max). Ratios: times better than the peer (above 1: jupyter-dist wins)."
    )
    for peer, error in errors.items():
        print(f"\n{peer} failed:\n{error.strip().splitlines()[-1]}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "sizes": sizes.to_json(), "results": results, "errors": errors},
                indent=1,
            )
        )
    return 1 if "jupyter_dist" in errors or "floors" in errors else 0
