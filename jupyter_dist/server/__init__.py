"""The Jupyter server extension: find running clusters, relay their state, act on them.

Enabled by installing the package (``jupyter-config/`` ships its config).
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from jupyter_dist.server.app import DistServerApp

    return [{"module": "jupyter_dist.server", "app": DistServerApp}]
