"""The tutorial notebooks run top to bottom in a real kernel, without errors."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))

# What each tutorial must show in its printed output (a new notebook needs an entry).
EXPECTED_TEXT = {
    "01-getting-started": [
        "[0] hello from",
        "engine 0 raised ZeroDivisionError: division by zero",
        "over its 500 MB limit",
    ],
    "02-parallel-cells": [
        "[0,1] ready",
        "[0,1] 4 batches done",
        "pi is about 3.14",
        "learning rate 0.1    final loss",
        "values               list",
        "(stops itself in ",
    ],
    "03-actors": [
        "steps done by the workers: 80",
        "updates: 80",
        "weights close to target: True",
        "ps ParameterServer on engine",
        "AttributeError: actor ps (ParameterServer) has no public method 'get_weights'",
        "ActorDiedError: actor ps was killed",
    ],
    "04-monitoring": [
        "engine 0: idle on",
        "engine 1: idle on",
        "total busy seconds: 4.0",
        "Counter state: {'count': 3}",
        "2 of 2 engines alive; tasks:",
        "stopped",
    ],
    "05-multi-gpu": [
        "[0] engine 0 of 2: rank 0 of 2, GPUs []",
        "[1] rank 1: loss",
        "both ranks recorded the same curve: True",
        "weights equal on both ranks: True",
        "gloo world size 2 ranks {0: 0, 1: 1}",
    ],
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_notebook_runs(path: Path, runtime_dir: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [o for cell in code_cells for o in cell.outputs]
    for cell in code_cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        expects_error = "raises-exception" in cell.metadata.get("tags", [])
        assert bool(errors) == expects_error, f"cell {cell.source[:60]!r}: {errors}"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for snippet in EXPECTED_TEXT[path.stem]:
        assert snippet in text
