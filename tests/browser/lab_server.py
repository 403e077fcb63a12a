"""A real ``jupyter lab`` for the browser tests, which a test may stop and start again."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.waiting import poll_for

LAB_START_TIMEOUT_S = 60
LOG_TAIL_CHARS = 3000
BASE_URLS = {"root": "/", "base-url": "/user/alice/lab-base/"}


@dataclass
class Lab:
    name: str  # "root" or "base-url"
    url: str  # ends with the base URL's slash
    token: str
    log: Path


class LabServer:
    """A ``jupyter lab`` process that a test may stop and start again, on the same port and token.

    Its root dir, settings and log live in ``tmp``; each start appends to the log.
    """

    def __init__(self, tmp: Path, runtime: Path, name: str) -> None:
        self.name = name
        self.runtime = runtime
        self.token = secrets.token_hex(16)
        self.log = tmp / "lab.log"
        self.port = 0  # the first start picks one, later starts reuse it
        self.process: subprocess.Popen[bytes] | None = None
        self._root = tmp / "root"
        self._root.mkdir()
        self._settings = tmp / "settings"
        apputils = self._settings / "@jupyterlab" / "apputils-extension"
        apputils.mkdir(parents=True)
        (apputils / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        self._workspaces = tmp / "workspaces"

    def start(self) -> Lab:
        """Start the server and wait until it has written its runtime file."""
        args = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
            f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={BASE_URLS[self.name]}", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self._root}", f"--LabApp.user_settings_dir={self._settings}",
            f"--LabApp.workspaces_dir={self._workspaces}", "--allow-root",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            process = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "JUPYTER_RUNTIME_DIR": str(self.runtime)},
            )
        self.process = process
        server_info: dict[str, object] = {}

        def server_file_written() -> bool:
            for path in self.runtime.glob(f"jpserver-{process.pid}.json"):
                try:
                    server_info.update(json.loads(path.read_text()))
                except json.JSONDecodeError:  # the server is still writing it
                    return False
            return bool(server_info) or process.poll() is not None

        poll_for(server_file_written, LAB_START_TIMEOUT_S, "the lab server's runtime file")
        if process.poll() is not None:
            pytest.fail(f"jupyter lab exited:\n{self.log.read_text()[-LOG_TAIL_CHARS:]}")
        self.port = int(str(server_info["port"]))
        return Lab(name=self.name, url=str(server_info["url"]), token=self.token, log=self.log)

    def stop(self) -> None:
        """SIGTERM the server by its pid (SIGKILL after 15 s); nothing if it is not running."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
