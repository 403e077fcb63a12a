"""Drive a real IPython kernel cell by cell, as a notebook does, and read its outputs with timing."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class CellRun:
    """What one executed cell produced: output messages (with arrival times) and its reply."""

    msg_id: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    def text(self, name: str = "stdout") -> str:
        return "".join(
            o["content"]["text"]
            for o in self.outputs
            if o["msg_type"] == "stream" and o["content"]["name"] == name
        )

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [o for o in self.outputs if o["msg_type"] == msg_type]

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of_type("error")
        return errors[0]["content"] if errors else None


class KernelSession:
    """One kernel, started with the test's runtime dir, that runs cells and collects what they show."""

    def __init__(self, env: dict[str, str]) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.other_outputs: list[dict[str, Any]] = []  # outputs that arrived for other cells

    def run(
        self, code: str, timeout_s: float = 60, interrupt_after_s: float | None = None
    ) -> CellRun:
        """Execute a cell; collect every output message of it until the kernel is idle again."""
        run = CellRun(started=time.monotonic())
        msg_id = run.msg_id = self.kc.execute(code)
        deadline = run.started + timeout_s
        interrupt_at = run.started + interrupt_after_s if interrupt_after_s is not None else None
        while True:
            if interrupt_at is not None and time.monotonic() >= interrupt_at:
                self.km.interrupt_kernel()
                interrupt_at = None
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"cell did not finish within {timeout_s} s: {code!r}"
                    ) from None
                continue
            msg_type = msg["msg_type"]
            parent_id = msg["parent_header"].get("msg_id")
            if parent_id != msg_id:
                if msg_type in ("stream", "display_data", "execute_result", "error"):
                    self.other_outputs.append(
                        {"msg_type": msg_type, "content": msg["content"], "parent": parent_id}
                    )
                continue
            if msg_type == "status" and msg["content"]["execution_state"] == "idle":
                break
            if msg_type in ("stream", "display_data", "execute_result", "error"):
                run.outputs.append(
                    {"msg_type": msg_type, "content": msg["content"], "at": time.monotonic()}
                )
        run.finished = time.monotonic()
        run.reply = self.kc.get_shell_msg(timeout=10)["content"]
        return run

    def restart(self) -> None:
        self.km.restart_kernel(now=True)
        self.kc.wait_for_ready(timeout=60)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
