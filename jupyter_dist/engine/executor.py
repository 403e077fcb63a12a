"""Run one task in the engine's IPython namespace and describe how it ended.

Cells run through an IPython ``InteractiveShell``, so magics and ``!cmd``
lines work and tracebacks show the cell's own lines. Functions sent with
``apply`` run in the same namespace's process; their source lines travel
with them (a notebook's cells exist only in the client's ``linecache``), so
their tracebacks show the user's code too.
"""

from __future__ import annotations

import linecache
import logging
from dataclasses import dataclass, field
from typing import Any

from IPython.core.displayhook import DisplayHook
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from jupyter_dist.errors import SerializationError
from jupyter_dist.serialize import deserialize

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """How a task ended: a value, or an error with its formatted traceback."""

    value: Any = None
    error: dict[str, str] | None = field(default=None)


class _ValueHook(DisplayHook):
    """Keep a cell's last expression as the task's value instead of printing ``Out[n]``."""

    def __call__(self, result: Any = None) -> None:
        if result is not None:
            self.fill_exec_result(result)  # type: ignore[no-untyped-call]


class _EngineShell(InteractiveShell):
    """An InteractiveShell that hands tracebacks to the executor instead of printing them."""

    last_error: dict[str, str] | None = None

    def _showtraceback(self, etype: type, evalue: BaseException, stb: list[str]) -> None:
        self.last_error = {
            "ename": etype.__name__,
            "evalue": str(evalue),
            "traceback": self.InteractiveTB.stb2text(stb),
        }


class Executor:
    """Owns the engine's namespace; runs tasks on the main thread."""

    def __init__(self, engine_id: int) -> None:
        self.engine_id = engine_id
        config = Config()
        config.HistoryManager.enabled = False
        config.InteractiveShell.colors = "nocolor"
        self.shell = _EngineShell.instance(config=config, displayhook_class=_ValueHook)
        self.shell.last_error = None

    @property
    def namespace(self) -> dict[str, Any]:
        return self.shell.user_ns  # type: ignore[no-any-return]

    def run(
        self, content: dict[str, Any], pickled: memoryview | None, raw: list[memoryview]
    ) -> Outcome:
        """Run one task described by a ``task_request``'s content and payload."""
        kind = content.get("kind")
        self.shell.last_error = None
        payload: Any = None
        try:
            payload = (
                deserialize(pickled, raw, f"the input of task {content['task_id']}")
                if pickled
                else None
            )
        except SerializationError as e:
            return Outcome(
                error={"ename": "SerializationError", "evalue": str(e), "traceback": str(e)}
            )
        if kind == "execute":
            return self._execute(content["code"])
        if kind == "apply":
            return self._apply(payload, content.get("sources", {}))
        if kind == "push":
            self.namespace.update(payload)
            return Outcome()
        if kind == "pull":
            return self._pull(content["names"])
        return Outcome(
            error={"ename": "ValueError", "evalue": f"unknown task kind {kind!r}", "traceback": ""}
        )

    def _execute(self, code: str) -> Outcome:
        result = self.shell.run_cell(code, store_history=False, silent=False)  # type: ignore[no-untyped-call]
        if not result.success:
            return Outcome(error=self._take_error(result.error_before_exec or result.error_in_exec))
        return Outcome(value=result.result)

    def _apply(
        self, payload: tuple[Any, tuple[Any, ...], dict[str, Any]], sources: dict[str, str]
    ) -> Outcome:
        fn, args, kwargs = payload
        for filename, text in sources.items():
            if filename not in linecache.cache:
                lines = text.splitlines(keepends=True)
                linecache.cache[filename] = (len(text), None, lines, filename)
        try:
            return Outcome(value=fn(*args, **kwargs))
        except BaseException as e:  # user code: everything it raises is reported
            if isinstance(e, SystemExit | GeneratorExit):
                logger.info("user code raised %s; the engine keeps running", type(e).__name__)
            self.shell.showtraceback(
                (type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
            )
            return Outcome(error=self._take_error(e))

    def _pull(self, names: list[str]) -> Outcome:
        missing = [name for name in names if name not in self.namespace]
        if missing:
            return Outcome(
                error={
                    "ename": "NameError",
                    "evalue": f"name {missing[0]!r} is not defined on engine {self.engine_id}",
                    "traceback": "",
                }
            )
        return Outcome(value=[self.namespace[name] for name in names])

    def _take_error(self, exc: BaseException | None) -> dict[str, str]:
        error: dict[str, str] | None = self.shell.last_error
        self.shell.last_error = None
        if error is None:
            name = type(exc).__name__ if exc is not None else "Error"
            error = {"ename": name, "evalue": str(exc), "traceback": f"{name}: {exc}"}
        return error
