"""The benchmark suite runs end to end with tiny sizes, so it cannot rot between ``make bench`` runs.

Only jupyter-dist and the floors run here (the peers are installed by
``make bench`` alone); no figure's value is checked, only that each one
was measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.figures import Sizes, catalog

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_runs_once_with_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks", "--quick", "--peers", "jupyter_dist,floors"),
            *("--json", str(out), "--timeout", "90"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    for figure in catalog(Sizes.quick()):
        peer = "floors" if figure.key.startswith("floor_") else "jupyter_dist"
        assert results[peer].get(figure.key), f"{figure.key} was not measured:\n{proc.stderr}"
    assert "| figure | unit | jupyter-dist |" in proc.stdout
