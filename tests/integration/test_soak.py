"""Load with faults, short: 4 clients on 8 engines while an engine and a client are SIGKILLed.

``make soak`` runs the long version (10,000 tasks a client); the checks
are the driver's own (benchmarks/soak.py): nothing lost, duplicated or
delivered to the wrong client, actor order kept, a killed client's
results kept, the controller's memory back within 20%.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)  # about 20 s alone on 2 cores
def test_load_with_an_engine_and_a_client_killed_loses_and_repeats_nothing(
    runtime_dir: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--tasks", "500", "--actor-calls", "100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    figures = json.loads(proc.stdout)
    assert figures["problems"] == []
    assert figures["killed_client_results_fetched"] > 0  # it died with results not yet taken in
    assert sorted(figures["latency_ms"]) == ["client1", "client2", "client3"]
