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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.formatters import DisplayFormatter
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from jupyter_dist import shm
from jupyter_dist.errors import JupyterDistError, SerializationError
from jupyter_dist.futures import FutureRef
from jupyter_dist.serialize import deserialize

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """How a task ended: a value, or an error with its formatted traceback."""

    value: Any = None
    error: dict[str, str] | None = field(default=None)


def plain_error(exc: BaseException) -> dict[str, str]:
    """An error of ours (not of user code): its message is the whole story."""
    return {"ename": type(exc).__name__, "evalue": str(exc), "traceback": str(exc)}


class _ValueHook(DisplayHook):
    """Keep a cell's last expression as the task's value instead of printing ``Out[n]``."""

    def __call__(self, result: Any = None) -> None:
        if result is not None:
            self.fill_exec_result(result)  # type: ignore[no-untyped-call]


# (message type, MIME bundle, metadata) -> sends a rich output of the running task.
DisplaySender = Callable[[str, dict[str, Any], dict[str, Any]], None]

_WIRE_SAFE = (str, int, float, bool, list, dict, type(None))


class _DisplayCapture(DisplayPublisher):
    """Send what user code displays (figures, HTML, ``display(...)``) to the client."""

    send: DisplaySender | None = None

    def publish(
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if self.send is not None:
            bundle = {mime: value for mime, value in data.items() if isinstance(value, _WIRE_SAFE)}
            self.send("display_data", bundle, metadata or {})

    def clear_output(self, wait: bool = False) -> None:
        """Clearing a notebook output from an engine is not supported; ignored."""


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

    def __init__(
        self,
        engine_id: int,
        send_display: DisplaySender,
        fetch_result: Callable[[str], Any],
        shm_pool: shm.SegmentPool | None = None,
    ) -> None:
        self.engine_id = engine_id
        self.shm_pool = shm_pool
        self.fetch_result = fetch_result
        config = Config()
        config.HistoryManager.enabled = False
        config.InteractiveShell.colors = "nocolor"
        self.shell = _EngineShell.instance(
            config=config, displayhook_class=_ValueHook, display_pub_class=_DisplayCapture
        )
        cast(_DisplayCapture, self.shell.display_pub).send = send_display
        self.send_display = send_display
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
            payload = self.load(content, pickled, raw)
        except SerializationError as e:
            return Outcome(error=plain_error(e))
        if kind == "execute":
            return self._execute(
                content["code"], content.get("execution_count"), bool(content.get("display_result"))
            )
        if kind == "apply":
            return self._apply(payload)
        if kind == "push":
            self.namespace.update(payload)
            return Outcome()
        if kind == "pull":
            return self._pull(content)
        return Outcome(
            error={"ename": "ValueError", "evalue": f"unknown task kind {kind!r}", "traceback": ""}
        )

    def _execute(self, code: str, execution_count: int | None, display_result: bool) -> Outcome:
        """Run a cell as cell number ``execution_count`` (the same on every engine of a broadcast).

        With ``display_result`` its value is shown (as ``Out[engine:n]``), not returned.
        """
        if execution_count is not None:
            self.shell.execution_count = execution_count
        result = self.shell.run_cell(code, store_history=True)  # type: ignore[no-untyped-call]
        if not result.success:
            return Outcome(error=self._take_error(result.error_before_exec or result.error_in_exec))
        if not display_result or result.result is None:
            return Outcome(value=result.result)
        formatter = cast(DisplayFormatter, self.shell.display_formatter)
        data, metadata = formatter.format(result.result)  # type: ignore[no-untyped-call]
        metadata = {**metadata, "execution_count": result.execution_count}
        self.send_display("execute_result", data, metadata)
        return Outcome()

    def load(
        self, content: dict[str, Any], pickled: memoryview | None, raw: list[memoryview]
    ) -> Any:
        """Unpickle a request's payload; make the source lines it carries known to tracebacks."""
        for filename, text in content.get("sources", {}).items():
            if filename not in linecache.cache:
                lines = text.splitlines(keepends=True)
                linecache.cache[filename] = (len(text), None, lines, filename)
        if not pickled:
            return None
        return deserialize(pickled, raw, f"the input of task {content['task_id']}")

    def resolve_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Replace futures among the arguments by their tasks' values (waits for them; raises their errors)."""
        resolved_args = tuple(self._resolve(a) for a in args)
        return resolved_args, {k: self._resolve(v) for k, v in kwargs.items()}

    def call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Outcome:
        """Call user code (any thread) with its arguments resolved."""
        try:
            args, kwargs = self.resolve_arguments(args, kwargs)
        except JupyterDistError as e:
            return Outcome(error=plain_error(e))
        try:
            return Outcome(value=fn(*args, **kwargs))
        except BaseException as e:  # user code: everything it raises is reported
            if isinstance(e, SystemExit | GeneratorExit):
                logger.info("user code raised %s; the engine keeps running", type(e).__name__)
            return Outcome(error=self.format_error(e))

    def _resolve(self, value: Any) -> Any:
        return self.fetch_result(value.task_id) if isinstance(value, FutureRef) else value

    def format_error(self, exc: BaseException) -> dict[str, str]:
        """The exception with the engine's traceback of user code (without this module's frame)."""
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None
        tbtools = self.shell.InteractiveTB
        stb = tbtools.structured_traceback(type(exc), exc, tb)
        return {"ename": type(exc).__name__, "evalue": str(exc), "traceback": tbtools.stb2text(stb)}

    def _apply(self, payload: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> Outcome:
        fn, args, kwargs = payload
        return self.call(fn, args, kwargs)

    def _pull(self, content: dict[str, Any]) -> Outcome:
        """Values of names; for a gather of large arrays, their layouts, or a write into the client's segment."""
        names = content["names"]
        missing = [name for name in names if name not in self.namespace]
        if missing:
            return Outcome(
                error={
                    "ename": "NameError",
                    "evalue": f"name {missing[0]!r} is not defined on engine {self.engine_id}",
                    "traceback": "",
                }
            )
        values = [self.namespace[name] for name in names]
        if content.get("into") is not None:
            try:
                dtype, shape, nbytes = content["layout"]
                layout = shm.ArrayLayout(dtype, tuple(shape), nbytes)
                shm.write_into(self.shm_pool, content["into"], content["offset"], layout, values[0])
            except (OSError, ValueError, TypeError) as e:
                return Outcome(error=plain_error(e))
            return Outcome()
        if content.get("in_place"):  # large arrays wait here until the client made room for them
            values = [shm.ArrayLayout.of(v) or v for v in values]
        return Outcome(value=values)

    def _take_error(self, exc: BaseException | None) -> dict[str, str]:
        error: dict[str, str] | None = self.shell.last_error
        self.shell.last_error = None
        if error is None:
            name = type(exc).__name__ if exc is not None else "Error"
            error = {"ename": name, "evalue": str(exc), "traceback": f"{name}: {exc}"}
        return error
