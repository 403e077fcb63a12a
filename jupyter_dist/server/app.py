"""The Jupyter server extension app: routes, the cluster watcher, and its life cycle."""

from __future__ import annotations

from typing import Any

from jupyter_server.extension.application import ExtensionApp

from jupyter_dist.server.clusters import ClusterWatcher
from jupyter_dist.server.handlers import route_table


class DistServerApp(ExtensionApp):
    """Adds ``<base_url>/jupyter-dist/...`` to the server; enabled when the package is installed."""

    name = "jupyter_dist"
    load_other_extensions = True

    def initialize_settings(self) -> None:
        self.watcher = ClusterWatcher()
        self.settings["jupyter_dist_watcher"] = self.watcher

    def initialize_handlers(self) -> None:
        self.handlers.extend(route_table())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """The loop runs now: start finding clusters."""
        self.watcher.start()

    async def stop_extension(self) -> None:
        await self.watcher.stop()
