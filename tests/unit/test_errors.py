"""The user-facing errors: their hierarchy and what their messages tell the user."""

from __future__ import annotations

import signal

import pytest

from jupyter_dist import errors
from jupyter_dist.errors import (
    CompositeRemoteError,
    ConnectionFileError,
    DistTimeoutError,
    EngineDiedError,
    JupyterDistError,
    NoEnginesError,
    RemoteError,
    describe_exit_code,
)

TRACEBACK = (
    "Traceback (most recent call last):\n"
    "  Cell In[3], line 2\n    1 / x\nZeroDivisionError: division by zero"
)


def test_engine_died_of_sigkill_names_the_signal_the_likely_cause_and_the_fix() -> None:
    error = EngineDiedError(2, pid=4711, host="gpu1", exit_code=-signal.SIGKILL, task_id="7f3c")

    message = str(error)

    assert message.startswith("Engine 2 (pid 4711 on gpu1) died with SIGKILL(-9) during task 7f3c.")
    assert "memory" in message
    assert "`%dist restart 2`" in message


def test_engine_died_keeps_its_fields_for_the_ui() -> None:
    error = EngineDiedError(1, pid=10, host="h", exit_code=3, task_id="t")
    assert (error.engine_id, error.pid, error.host, error.exit_code, error.task_id) == (
        1,
        10,
        "h",
        3,
        "t",
    )


def test_engine_died_with_an_exit_code_does_not_blame_memory() -> None:
    message = str(EngineDiedError(0, pid=5, host="n1", exit_code=1))

    assert "died with exit code 1." in message
    assert "memory" not in message
    assert "during task" not in message
    assert "`%dist restart 0`" in message


def test_engine_died_without_details_still_says_what_to_do() -> None:
    assert str(EngineDiedError(3)) == "Engine 3 died. `%dist restart 3` replaces it."


def test_engine_over_its_memory_limit_says_how_much_it_used_and_what_happens_next() -> None:
    error = EngineDiedError(
        2,
        pid=4711,
        host="gpu1",
        exit_code=-signal.SIGKILL,
        task_id="7f3c",
        rss_bytes=2_100_000_000,
        memory_limit_bytes=2_000_000_000,
        is_restarting=True,
    )

    message = str(error)

    assert message.startswith("Engine 2 used 2.1 GB, over its 2 GB limit, so it was stopped")
    assert "during task 7f3c" in message
    assert "A fresh engine 2 takes its place" in message
    assert "--memory-limit" in message
    assert "The OS may have killed it" not in message  # the controller did, and says why
    assert (error.rss_bytes, error.memory_limit_bytes, error.is_restarting) == (
        2_100_000_000,
        2_000_000_000,
        True,
    )


def test_engine_just_over_its_memory_limit_shows_digits_that_tell_them_apart() -> None:
    message = str(EngineDiedError(0, rss_bytes=3 * 2**29 + 5 * 2**20, memory_limit_bytes=3 * 2**29))

    assert "used 1.50488 GiB, over its 1.5 GiB limit" in message
    assert "`%dist restart 0` replaces it" in message  # not restarted by its controller


def test_engine_died_with_a_pid_but_no_host_leaves_no_empty_host() -> None:
    message = str(EngineDiedError(3, pid=99, exit_code=-signal.SIGSEGV))

    assert message.startswith("Engine 3 (pid 99) died with SIGSEGV(-11).")


@pytest.mark.parametrize(
    ("exit_code", "text"),
    [
        (-9, "SIGKILL(-9)"),
        (-15, "SIGTERM(-15)"),
        (-11, "SIGSEGV(-11)"),
        (0, "exit code 0"),
        (1, "exit code 1"),
        (137, "exit code 137"),
        (-200, "signal 200"),
    ],
)
def test_describe_exit_code_reads_like_a_person_would(exit_code: int, text: str) -> None:
    assert describe_exit_code(exit_code) == text


def test_remote_error_keeps_the_engine_traceback_and_shows_it() -> None:
    error = RemoteError(2, "ZeroDivisionError", "division by zero", TRACEBACK)

    assert (error.engine_id, error.ename, error.evalue) == (
        2,
        "ZeroDivisionError",
        "division by zero",
    )
    assert error.traceback == TRACEBACK
    assert str(error) == f"[engine 2] ZeroDivisionError: division by zero\n{TRACEBACK}"
    assert error.args == ("[engine 2] ZeroDivisionError: division by zero",)


def test_remote_error_renders_the_engine_traceback_for_ipython() -> None:
    error = RemoteError(2, "ZeroDivisionError", "division by zero", TRACEBACK)

    assert error._render_traceback_() == ["[engine 2]", *TRACEBACK.splitlines()]


def _remote(engine_id: int, evalue: str = "division by zero") -> RemoteError:
    return RemoteError(engine_id, "ZeroDivisionError", evalue, TRACEBACK + f"\n({evalue})")


def test_composite_remote_error_shows_an_identical_traceback_once_with_all_its_engines() -> None:
    error = CompositeRemoteError([_remote(0), _remote(1), _remote(3)])

    text = str(error)
    rendered = error._render_traceback_()

    assert text.count("Traceback (most recent call last)") == 1
    assert "[engines 0,1,3]" in text
    assert rendered[0] == "3 engines raised: [engines 0,1,3] ZeroDivisionError: division by zero"
    assert rendered.count("Traceback (most recent call last):") == 1
    assert rendered[1] == "[engines 0,1,3]"


def test_composite_remote_error_shows_each_distinct_traceback_with_its_engines() -> None:
    error = CompositeRemoteError([_remote(0, "a"), _remote(1, "b"), _remote(2, "a")])

    rendered = error._render_traceback_()

    assert rendered[0] == (
        "3 engines raised: [engines 0,2] ZeroDivisionError: a; [engines 1] ZeroDivisionError: b"
    )
    assert rendered.count("Traceback (most recent call last):") == 2
    assert rendered.index("[engines 0,2]") < rendered.index("[engines 1]")
    assert len(error.errors) == 3


def test_composite_remote_error_is_a_remote_error_of_its_first_engine() -> None:
    error = CompositeRemoteError([_remote(4), _remote(5)])

    assert isinstance(error, RemoteError)
    assert (error.engine_id, error.ename) == (4, "ZeroDivisionError")


def test_dist_timeout_error_is_also_a_builtin_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        raise DistTimeoutError("no engines after 5 s")
    assert issubclass(DistTimeoutError, JupyterDistError)


def test_no_engines_error_says_how_to_get_engines() -> None:
    message = str(NoEnginesError("a1b2"))

    assert "No engines are running in cluster 'a1b2'." in message
    assert "`%dist start -n 4`" in message
    assert "c.wait_for_engines(4)" in message


def test_connection_file_error_names_the_file_and_the_problem() -> None:
    error = ConnectionFileError("/run/jd-x.json", "it is not JSON")

    assert (error.path, error.problem) == ("/run/jd-x.json", "it is not JSON")
    assert "'/run/jd-x.json': it is not JSON" in str(error)
    assert "jupyter-dist list" in str(error)


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n != "describe_exit_code"])
def test_every_error_derives_from_jupyter_dist_error(name: str) -> None:
    assert issubclass(getattr(errors, name), JupyterDistError)
