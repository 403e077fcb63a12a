"""Actors: stateful objects living on engines, driven through real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import cloudpickle
import numpy as np
import pytest

import jupyter_dist as jd
from tests.waiting import poll_for

# The engines cannot import this test module: send its classes by value, as notebook classes are.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.count = start
        self.history: list[int] = []

    def incr(self, n: int = 1) -> int:
        self.count += n
        return self.count

    def record(self, caller: int, seq: int) -> None:
        self.history.append(caller * 1_000_000 + seq)

    def read_history(self) -> list[int]:
        return self.history

    def fail(self) -> None:
        raise ValueError(f"count is {self.count}")

    def shout(self) -> None:
        print("count is", self.count)


class Sleeper:
    def nap(self, seconds: float) -> tuple[float, float]:
        start = time.time()
        time.sleep(seconds)
        return start, time.time()


class AsyncSleeper:
    async def nap(self, seconds: float) -> tuple[float, float]:
        start = time.time()
        await asyncio.sleep(seconds)
        return start, time.time()


class Scaled:
    def __init__(self) -> None:
        self.factor = 3
        self._hidden = "not shown"

    def __dist_state__(self) -> dict[str, int]:
        return {"factor_squared": self.factor**2}

    def times(self, values: np.ndarray) -> np.ndarray:
        return values * self.factor


def test_thousand_ordered_calls_end_in_the_expected_state(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter, 10)
    futures = [counter.incr(i) for i in range(1000)]
    assert [f.result(timeout=30) for f in futures] == [10 + sum(range(i + 1)) for i in range(1000)]
    assert counter.state() == {"count": 10 + sum(range(1000)), "history": []}
    counter.kill()


def test_calls_from_four_threads_keep_each_threads_order(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter)
    rounds = threading.Barrier(4, timeout=30)

    def caller(k: int) -> None:
        futures = []
        for start in range(0, 200, 20):
            futures += [counter.record(k, seq) for seq in range(start, start + 20)]
            rounds.wait()  # every thread sends a batch before any sends its next: they interleave
        for f in futures:
            f.result(timeout=30)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    history = counter.read_history().result(timeout=10)
    assert len(history) == 800
    for k in range(4):
        own = [h % 1_000_000 for h in history if h // 1_000_000 == k]
        assert own == list(range(200))
    assert history != sorted(history), "the threads never interleaved; the test shows nothing"
    counter.kill()


def test_actors_on_two_engines_run_concurrently(cluster: jd.Cluster) -> None:
    first = cluster[0].actor(Sleeper)
    second = cluster[1].actor(Sleeper)
    a, b = first.nap(1.0), second.nap(1.0)
    (start_a, end_a), (start_b, end_b) = a.result(10), b.result(10)
    assert start_a < end_b
    assert start_b < end_a
    assert a.engine == 0
    assert b.engine == 1
    first.kill()
    second.kill()


def test_actor_calls_do_not_wait_for_tasks_on_their_engine(cluster: jd.Cluster) -> None:
    counter = cluster[0].actor(Counter)
    busy = cluster[0].run("import time; time.sleep(1.5)", block=False)
    assert counter.incr().result(timeout=1.0) == 1
    assert not busy.done()
    busy.result(10)
    counter.kill()


def test_max_concurrency_and_async_methods_overlap_calls_on_one_actor(cluster: jd.Cluster) -> None:
    for cls in (Sleeper, AsyncSleeper):
        actor = cluster.actor(cls, max_concurrency=2)
        a, b = actor.nap(0.8), actor.nap(0.8)
        (_, end_a), (start_b, _) = a.result(10), b.result(10)
        assert start_b < end_a, f"{cls.__name__} calls ran one after the other"
        actor.kill()
    serial = cluster.actor(AsyncSleeper)
    (_, end_a), (start_b, _) = serial.nap(0.3).result(10), serial.nap(0.3).result(10)
    assert start_b >= end_a
    serial.kill()


def test_state_uses_dist_state_and_method_results_zero_copy(cluster: jd.Cluster) -> None:
    scaled = cluster.actor(Scaled)
    assert scaled.state() == {"factor_squared": 9}
    values = np.arange(200_000, dtype=np.float64)
    np.testing.assert_array_equal(scaled.times(values).result(10), values * 3)
    scaled.kill()


def test_method_exception_is_a_remote_error_and_state_survives(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter, 5)
    with pytest.raises(jd.RemoteError, match="count is 5") as info:
        counter.fail().result(timeout=10)
    assert info.value.ename == "ValueError"
    assert "raise ValueError" in info.value.traceback
    assert counter.incr().result(timeout=10) == 6
    counter.kill()


def test_constructor_error_raises_from_actor(cluster: jd.Cluster) -> None:
    with pytest.raises(jd.RemoteError) as info:
        cluster.actor(Counter, "not a number", "too many")
    assert info.value.ename == "TypeError"


def test_kill_ends_the_actor_and_later_calls_fail_clearly(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter)
    counter.kill()
    with pytest.raises(jd.ActorDiedError, match="actor Counter was killed"):
        counter.incr().result(timeout=10)
    assert counter.actor_id not in [a.actor_id for a in cluster.actors()]


def test_unknown_method_names_the_methods(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter)
    with pytest.raises(AttributeError, match="has no public method 'decr'; it has: fail, incr"):
        counter.decr()
    counter.kill()


def test_actors_lists_living_actors_with_counts_and_state(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter, name="listed")
    counter.incr(7).result(10)

    def listed() -> jd.ActorInfo | None:
        return next((a for a in cluster.actors() if a.name == "listed"), None)

    poll_for(
        lambda: (info := listed()) is not None and info.state == {"count": 7, "history": "[]"},
        5,
        "state in the stream",
    )
    info = listed()
    assert info is not None
    assert info.class_name == "Counter"
    assert info.calls_done == 1
    assert info.pending == 0
    counter.kill()


def test_named_actor_is_found_from_another_process(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter, 100, name="shared-counter")
    script = textwrap.dedent(
        f"""
        import jupyter_dist as jd
        c = jd.Cluster.connect({cluster.id!r})
        print(c.get_actor("shared-counter").incr(1).result(10))
        c.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "101"
    assert counter.incr().result(10) == 102
    with pytest.raises(jd.RemoteError, match="already exists"):
        cluster.actor(Counter, name="shared-counter")
    with pytest.raises(jd.ClusterError, match="No actor named 'nobody'"):
        cluster.get_actor("nobody")
    counter.kill()


def test_handle_passed_to_a_task_and_to_another_actor_calls_the_same_object(
    cluster: jd.Cluster,
) -> None:
    counter = cluster.actor(Counter)
    assert cluster.submit(lambda h: h.incr(10).result(10), counter).result(10) == 10
    assert cluster[1].apply(lambda h: h.incr(1).result(10), counter) == 11
    assert counter.state()["count"] == 11
    counter.kill()


def test_future_passed_as_argument_is_resolved_on_the_engines(cluster: jd.Cluster) -> None:
    counter = cluster.actor(Counter, 1)
    first = counter.incr(41)
    assert counter.incr(first).result(10) == 84
    task = cluster.submit(lambda a, b: a + b, first, counter.incr(0))
    assert task.result(10) == 42 + 84


def test_output_goes_to_the_caller_tagged_with_the_actor(
    cluster: jd.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    counter = cluster.actor(Counter, 3, name="loud")
    counter.shout().result(10)
    assert "[loud] count is 3" in capsys.readouterr().out
    counter.kill()


def test_killing_an_actors_engine_fails_its_calls(fresh_cluster: jd.Cluster) -> None:
    c = fresh_cluster
    sleeper = c[1].actor(Sleeper)
    pending = sleeper.nap(30)
    poll_for(lambda: any(a.pending for a in c.actors()), 5, "call pending")
    os.kill(c.status()[1].pid, signal.SIGKILL)
    with pytest.raises(jd.ActorDiedError, match="lived on engine 1, which died"):
        pending.result(timeout=10)
    with pytest.raises(jd.ActorDiedError, match="engine 1, which died"):
        sleeper.nap(0).result(timeout=10)


def test_actor_with_max_restarts_is_made_again_on_another_engine(fresh_cluster: jd.Cluster) -> None:
    c = fresh_cluster
    counter = c[1].actor(Counter, 5, max_restarts=1)
    assert counter.incr().result(10) == 6
    os.kill(c.status()[1].pid, signal.SIGKILL)
    poll_for(lambda: [a.engine_id for a in c.actors()] == [0], 10, "actor moved to engine 0")
    assert counter.incr().result(10) == 6, "the constructor did not run again"
    assert c.actors()[0].restarts == 1
