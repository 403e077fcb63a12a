"""Futures in steps (``then``) and over several (``MultiFuture``): every outcome reaches the caller."""

from __future__ import annotations

import gc

import pytest

from jupyter_dist.futures import Future, MultiFuture, then


def test_then_gives_the_value_of_its_step() -> None:
    first = Future("t1")
    out = then(first, lambda v: v * 2)
    first.set_result(21)
    assert out.result(1) == 42


def test_then_takes_the_value_of_a_future_its_step_returns() -> None:
    first, second = Future("t1"), Future("t2")
    out = then(first, lambda _: second)
    first.set_result(None)
    assert not out.done()
    second.set_result("late")
    assert out.result(1) == "late"


@pytest.mark.parametrize("failing", ["first", "step", "second"])
def test_then_passes_on_every_failure(failing: str) -> None:
    first, second = Future("t1"), Future("t2")

    def step(_: object) -> Future:
        if failing == "step":
            raise ValueError("step failed")
        return second

    out = then(first, step)
    if failing == "first":
        first.set_exception(ValueError("first failed"))
    else:
        first.set_result(None)
        second.set_exception(ValueError("second failed"))
    with pytest.raises(ValueError, match=f"{failing} failed"):
        out.result(1)


def test_a_multifuture_whose_combine_raises_fails_instead_of_hanging() -> None:
    child = Future("c1")
    multi = MultiFuture("m1", [child], lambda _: [].pop())
    child.set_result(1)
    with pytest.raises(IndexError):
        multi.result(1)


def test_then_keeps_the_multifutures_it_waits_on_alive() -> None:
    # A MultiFuture's children link back weakly: only the future of `then` holds it.
    first_child, second_child = Future("c1"), Future("c2")
    out = then(
        MultiFuture("m1", [first_child], lambda vs: vs[0]),
        lambda v: MultiFuture("m2", [second_child], lambda vs: vs[0] + v),
    )
    gc.collect()
    first_child.set_result(1)
    gc.collect()
    second_child.set_result(2)
    assert out.result(1) == 3
    assert out.steps == ()  # let go once done
