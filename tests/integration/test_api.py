"""The Cluster API table of DESIGN.md, driven against real controller and engine processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import jupyter_dist as jd
from tests.waiting import poll_for


def test_run_returns_the_last_expression_per_engine(cluster: jd.Cluster) -> None:
    pids = cluster.run("import os; os.getpid()")
    assert len(pids) == 2
    assert len(set(pids)) == 2
    assert sorted(pids) == sorted(e.pid for e in cluster.status())
    assert cluster.run("x_run = 5") == [None, None]


def test_run_accepts_magics_and_shell_lines(cluster: jd.Cluster) -> None:
    assert cluster[0].run("%time y_magic = 3\ny_magic") == 3
    assert cluster[0].run("out = !echo shell-ok\nout[0]") == "shell-ok"


def test_run_accepts_top_level_await_as_a_notebook_cell_does(cluster: jd.Cluster) -> None:
    code = "import asyncio\nasync def twice(v):\n    return 2 * v\nawait twice(21)"
    assert cluster[0].run(code) == 42
    assert cluster[0].run("async with asyncio.timeout(5):\n    z_async = 7\nz_async") == 7


def test_apply_calls_a_function_on_every_engine(cluster: jd.Cluster) -> None:
    assert cluster.apply(lambda a, b=1: a * b, 6, b=7) == [42, 42]
    assert cluster[1].apply(divmod, 7, 2) == (3, 1)


def test_push_and_pull_names(cluster: jd.Cluster) -> None:
    cluster.push(a=1, b=[1, 2])
    cluster.push({"c": "three"})
    assert cluster.pull("a") == [1, 1]
    assert cluster.pull(["b", "c"]) == [[[1, 2], "three"], [[1, 2], "three"]]
    assert cluster.run("a + len(b)") == [3, 3]


def test_pull_of_an_unknown_name_raises_a_name_error(cluster: jd.Cluster) -> None:
    with pytest.raises(jd.RemoteError, match="not defined on engine 0") as info:
        cluster[0].pull("never_defined")
    assert info.value.ename == "NameError"
    assert info.value.engine_id == 0


@pytest.mark.parametrize(
    "data",
    [
        list(range(7)),
        tuple(range(5)),
        np.arange(11.0),
        np.arange(30).reshape(10, 3),
        torch.arange(9),
        list(range(1)),
        range(3, 50, 4),
        "scattered text",
    ],
    ids=[
        "list",
        "tuple",
        "ndarray",
        "ndarray-2d",
        "tensor",
        "fewer-items-than-engines",
        "range",
        "str",
    ],
)
def test_scatter_gather_round_trip_keeps_type_and_order(cluster: jd.Cluster, data: object) -> None:
    cluster.scatter("part", data)
    lengths = cluster.run("len(part)")
    assert max(lengths) - min(lengths) <= 1
    assert sum(lengths) == len(data)  # type: ignore[arg-type]
    back = cluster.gather("part")
    assert type(back) is type(data)
    if isinstance(data, np.ndarray):
        np.testing.assert_array_equal(back, data)
    elif isinstance(data, torch.Tensor):
        assert torch.equal(back, data)
    else:
        assert back == data


def test_engine_k_gets_chunk_k(cluster: jd.Cluster) -> None:
    cluster.scatter("chunk", list(range(5)))
    assert cluster[0].pull("chunk") == [0, 1, 2]
    assert cluster[1].pull("chunk") == [3, 4]


def test_hundred_megabyte_array_round_trip(cluster: jd.Cluster) -> None:
    big = np.random.default_rng(0).integers(0, 255, size=100 * 1024 * 1024, dtype=np.uint8)
    cluster[0].push(big=big)
    assert cluster[0].run("int(big.sum())") == int(big.sum())
    back = cluster[0].pull("big")
    np.testing.assert_array_equal(back, big)
    back[0] = 1  # arrives writable
    cluster[0].run("del big")


def test_torch_tensors_cross_with_dtype_and_shape(cluster: jd.Cluster) -> None:
    t = torch.randn(64, 1024, dtype=torch.float32)
    bf = torch.ones(3, 5, dtype=torch.bfloat16)
    cluster[0].push(t=t, bf=bf)
    assert cluster[0].run("(t.dtype, tuple(t.shape), float(t.sum()))")[2] == pytest.approx(
        float(t.sum()), rel=1e-5
    )
    assert torch.equal(cluster[0].pull("bf"), bf)


def test_submit_returns_a_future_with_id_and_engine(cluster: jd.Cluster) -> None:
    future = cluster.submit(pow, 2, 10)
    assert isinstance(future, jd.Future)
    assert future.result(timeout=10) == 1024
    assert future.done()
    assert future.exception() is None
    assert future.engine in (0, 1)
    assert isinstance(future.id, str)
    assert future.id


def test_futures_are_awaitable(cluster: jd.Cluster) -> None:
    async def main() -> list[int]:
        return list(await asyncio.gather(cluster.submit(abs, -3), cluster.submit(abs, -4)))

    assert asyncio.run(main()) == [3, 4]


def test_non_blocking_calls_return_futures(cluster: jd.Cluster) -> None:
    future = cluster.run("21 * 2", block=False)
    assert isinstance(future, jd.Future)
    assert future.result(timeout=10) == [42, 42]
    futures = cluster.map(abs, [-1, -2, -3], block=False)
    assert [f.result(timeout=10) for f in futures] == [1, 2, 3]


def test_map_keeps_order(cluster: jd.Cluster) -> None:
    assert cluster.map(lambda x, y: x - y, range(50), range(0, 100, 2)) == [
        x - 2 * x for x in range(50)
    ]


def test_load_balancing_spreads_work_while_an_engine_is_busy(cluster: jd.Cluster) -> None:
    slow = cluster[0].run("import time; time.sleep(1.5)", block=False)
    engines = {
        f.result(timeout=10)
        for f in [cluster.submit(lambda: __import__("os").getpid()) for _ in range(20)]
    }
    assert engines == {cluster.status()[1].pid}, "tasks went to the busy engine"
    slow.result(timeout=10)
    spread = cluster.map(lambda _: __import__("os").getpid(), range(200))
    assert len(set(spread)) == 2


def test_views_select_engines(cluster: jd.Cluster) -> None:
    assert cluster[0].run("1") == 1
    assert cluster[0:2].run("2") == [2, 2]
    assert cluster[[1, 0]].apply(lambda: 3) == [3, 3]
    assert cluster[[1]].engine_ids == [1]
    pid1 = cluster.status()[1].pid
    assert {cluster[[1]].submit(__import__("os").getpid).result(10) for _ in range(5)} == {pid1}


def test_remote_error_carries_engine_name_value_and_source_lines(cluster: jd.Cluster) -> None:
    code = "def f(x):\n    return 10 / x\n\nf(0)\n"
    with pytest.raises(jd.CompositeRemoteError) as info:
        cluster.run(code)
    error = info.value
    assert len(error.errors) == 2
    assert {e.engine_id for e in error.errors} == {0, 1}
    first = error.errors[0]
    assert first.ename == "ZeroDivisionError"
    assert first.evalue == "division by zero"
    assert "return 10 / x" in first.traceback
    assert "f(0)" in first.traceback
    assert (
        str(error).count("ZeroDivisionError: division by zero") == 2
    )  # once in the summary, once shown
    with pytest.raises(jd.RemoteError) as one:
        cluster[1].run("raise KeyError('k')")
    assert one.value.engine_id == 1
    assert one.value.ename == "KeyError"


def test_apply_traceback_shows_the_function_source(cluster: jd.Cluster) -> None:
    def failing(n: int) -> float:
        denominator = n - n
        return n / denominator

    with pytest.raises(jd.RemoteError) as info:
        cluster[0].apply(failing, 3)
    assert "n / denominator" in info.value.traceback


def test_syntax_error_in_code_is_reported_and_the_cluster_survives(cluster: jd.Cluster) -> None:
    with pytest.raises(jd.RemoteError) as info:
        cluster[0].run("def broken(:\n    pass")
    assert info.value.ename == "SyntaxError"
    assert cluster[0].run("'alive'") == "alive"


def test_unpicklable_argument_raises_serialization_error_naming_it(cluster: jd.Cluster) -> None:
    import sqlite3

    conn = sqlite3.connect(":memory:")
    with pytest.raises(jd.SerializationError, match=r"'conn' \(sqlite3.Connection\)"):
        cluster.push(conn=conn, fine=1)
    assert cluster.run("'still working'") == ["still working", "still working"]


def test_unpicklable_result_raises_serialization_error(cluster: jd.Cluster) -> None:
    with pytest.raises(jd.SerializationError, match="result"):
        cluster[0].run("import threading; threading.Lock()")
    assert cluster[0].run("1 + 1") == 2


def test_status_and_history(cluster: jd.Cluster) -> None:
    cluster.run("None")
    records = cluster.status()
    assert [r.engine_id for r in records] == [0, 1]
    assert all(r.state in ("idle", "busy") for r in records)
    future = cluster.submit(abs, -1)
    future.result(10)
    history = cluster.history(10)
    assert any(
        t.task_id == future.id and t.state == "done" and t.engine_id == future.engine
        for t in history
    )


def test_get_result_from_another_process_after_the_submitter_left(cluster: jd.Cluster) -> None:
    script = textwrap.dedent(
        f"""
        import jupyter_dist as jd
        c = jd.Cluster.connect({cluster.id!r})
        f = c.submit(sum, [1, 2, 3])
        print(f.id)
        c.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    task_id = out.stdout.strip()
    assert cluster.get_result(task_id, timeout_s=10) == 6
    with pytest.raises(jd.ClusterError, match="no result"):
        cluster.get_result("no-such-task", timeout_s=10)


def test_connect_by_id_path_and_newest(cluster: jd.Cluster) -> None:
    for target in (cluster.id, cluster.connection_file, None):
        other = jd.Cluster.connect(target)
        try:
            assert other.id == cluster.id
            assert other.run("1") == [1, 1]
        finally:
            other.close()
    with pytest.raises(jd.ClusterError, match="No cluster with id 'nope'"):
        jd.Cluster.connect("nope")


def test_result_timeout_raises_dist_timeout_error(cluster: jd.Cluster) -> None:
    future = cluster[0].run("import time; time.sleep(0.5)", block=False)
    with pytest.raises(jd.DistTimeoutError, match=r"did not finish within 0\.01 s"):
        future.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)
    future.result(timeout=10)


def test_output_streams_while_the_code_runs(
    cluster: jd.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    future = cluster[0].run(
        "import sys, time\nprint('first', flush=True)\ntime.sleep(1.0)\nprint('oops', file=sys.stderr)\n",
        block=False,
    )
    seen = ""

    def first_line_arrived() -> bool:
        nonlocal seen
        seen += capsys.readouterr().out
        return "[0] first" in seen

    poll_for(first_line_arrived, 5, "the first line")
    assert not future.done(), "output arrived only at the end"
    future.result(timeout=10)
    assert "[0] oops\n" in capsys.readouterr().err


def test_lines_all_engines_print_alike_are_shown_once(
    cluster: jd.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.run("print('same everywhere')\nimport os\nprint('pid', os.getpid())")
    out = capsys.readouterr().out
    assert out.count("same everywhere") == 1
    assert "[0,1] same everywhere" in out
    for engine in cluster.status():
        assert f"[{engine.engine_id}] pid {engine.pid}" in out
