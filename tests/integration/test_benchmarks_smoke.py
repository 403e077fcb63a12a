"""The benchmark suite runs end to end with tiny sizes, so it cannot rot between ``make bench`` runs.

Only jupyter-dist and the floors run here (the peers are installed by
``make bench`` alone; the torch start-up runs on jupyter-dist alone, with
2 engines); no figure's value is checked, only that each one was measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.figures import Sizes, catalog, torch_catalog

ROOT = Path(__file__).resolve().parents[2]


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <args>`` from the repository root; fail the test if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_every_benchmark_runs_once_with_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    proc = _run_module(
        *("benchmarks", "--quick", "--figures", "core", "--peers", "jupyter_dist,floors"),
        *("--json", str(out), "--timeout", "90"),
    )
    results = json.loads(out.read_text())["results"]
    for figure in catalog(Sizes.quick()):
        peer = "floors" if figure.key.startswith("floor_") else "jupyter_dist"
        assert results[peer].get(figure.key), f"{figure.key} was not measured:\n{proc.stderr}"
    assert "| figure | unit | jupyter-dist |" in proc.stdout


def test_the_torch_start_up_runs_once_on_two_engines(tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    proc = _run_module(
        *("benchmarks", "--quick", "--figures", "torch", "--peers", "jupyter_dist"),
        *("--json", str(out), "--timeout", "90"),
    )
    results = json.loads(out.read_text())["results"]["jupyter_dist"]
    for figure in torch_catalog(Sizes.quick()):
        assert results.get(figure.key), f"{figure.key} was not measured:\n{proc.stderr}"
    assert "start 2 processes with a gloo group, to the first all_reduce" in proc.stdout
    assert "| figure | unit | jupyter-dist | torchrun | accelerate | floor |" in proc.stdout


def test_the_cpu_breakdown_names_every_process_of_both_calls() -> None:
    proc = _run_module("benchmarks.cpu_breakdown", "--calls", "10")
    round_trip, broadcast = proc.stdout.split("broadcast of")
    for label in ("client", "controller", "engine 0"):
        assert f"  {label} " in round_trip
    assert "  engine 7 " in broadcast
    assert round_trip.count("all threads:") == broadcast.count("all threads:") == 1
