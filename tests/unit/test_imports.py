"""Import hygiene: what importing each part of jupyter-dist loads, and what it starts.

The exception among the unit tests: each check needs a fresh interpreter, so
these start a ``python -c`` subprocess each (about 0.2 s apiece). Nothing else
in tests/unit starts a process.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import jupyter_dist

PACKAGE_DIR = Path(jupyter_dist.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent

# The dependency direction: controller and engine never reach the client side or the UI.
CLIENT_SIDE = ("jupyter_dist.client", "jupyter_dist.magics", "jupyter_dist.widgets")
UI_SIDE = ("jupyter_dist.server", "IPython.display", "ipywidgets", "tqdm")


def fresh_import(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; return the JSON report it prints last."""
    report = textwrap.dedent(
        """
        import json, sys, threading
        print(json.dumps({"modules": sorted(sys.modules), "threads": threading.active_count(),
                          **globals().get("extra", {})}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + report],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"the import failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def under(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_importing_the_package_loads_neither_torch_nor_numpy_and_starts_no_threads() -> None:
    report = fresh_import("import jupyter_dist")

    assert under(report["modules"], ("torch", "numpy")) == []
    assert report["threads"] == 1


def test_the_wire_modules_load_torch_and_numpy_only_on_first_use() -> None:
    report = fresh_import("import jupyter_dist.protocol, jupyter_dist.serialize")

    assert under(report["modules"], ("torch", "numpy")) == []


def test_the_controller_imports_no_ipython_and_nothing_from_the_client_side() -> None:
    report = fresh_import("import jupyter_dist.controller.app")

    assert under(report["modules"], ("IPython", *CLIENT_SIDE, *UI_SIDE, "torch")) == []
    assert report["threads"] == 1


def test_the_engine_imports_nothing_from_the_client_side_or_the_ui() -> None:
    # The engine's InteractiveShell itself imports IPython.display, so that module is
    # loaded first and left out of the comparison; the source check below covers it.
    report = fresh_import(
        """
        import sys
        import IPython.core.interactiveshell
        before = set(sys.modules)
        import jupyter_dist.engine.app
        extra = {"added": sorted(set(sys.modules) - before)}
        """
    )

    assert (
        under(report["modules"], (*CLIENT_SIDE, "jupyter_dist.server", "ipywidgets", "tqdm")) == []
    )
    assert under(report["added"], ("IPython.display", "pynvml")) == []  # NVML: on first sample
    assert report["threads"] == 1


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        ("engine", (*CLIENT_SIDE, *UI_SIDE)),
        ("controller", ("IPython", *CLIENT_SIDE, *UI_SIDE)),
    ],
)
def test_no_controller_or_engine_source_imports_a_forbidden_module(
    part: str, forbidden: tuple[str, ...]
) -> None:
    offenders = []
    for path in sorted((PACKAGE_DIR / part).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in under(names, forbidden)]

    assert offenders == []
