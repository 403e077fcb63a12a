"""The poll loop: timers, calls handed over from other threads, socket readers and faults.

Each test runs the loop on a thread of its own and joins it with a timeout, so a
broken loop fails the test instead of hanging it. Nothing waits for a duration.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from jupyter_dist.ioloop import MAX_BATCH, IOLoop

JOIN_TIMEOUT_S = 5.0


@pytest.fixture
def loop() -> Iterator[IOLoop]:
    io_loop = IOLoop()
    yield io_loop
    io_loop.close()


def then_stop(loop: IOLoop, callback: Callable[[], object]) -> Callable[[], None]:
    """A callback that runs ``callback`` and then stops the loop."""

    def run_and_stop() -> None:
        callback()
        loop.stop()

    return run_and_stop


def start(loop: IOLoop) -> threading.Thread:
    thread = threading.Thread(target=loop.run, name="test-io-loop", daemon=True)
    thread.start()
    return thread


def join(loop: IOLoop, thread: threading.Thread) -> None:
    """Wait for ``run()`` to return; stop the loop and fail if it does not."""
    thread.join(JOIN_TIMEOUT_S)
    if thread.is_alive():
        loop.stop()
        thread.join(JOIN_TIMEOUT_S)
        pytest.fail(f"the loop did not stop within {JOIN_TIMEOUT_S} s")


def run_until_stopped(loop: IOLoop) -> None:
    join(loop, start(loop))


# ---- timers ---------------------------------------------------------------------


def test_call_later_runs_timers_in_deadline_order(loop: IOLoop) -> None:
    ran: list[str] = []
    loop.call_later(0.003, lambda: ran.append("third"))
    loop.call_later(0.001, lambda: ran.append("first"))
    loop.call_later(0.002, lambda: ran.append("second"))
    loop.call_later(0.004, loop.stop)

    run_until_stopped(loop)

    assert ran == ["first", "second", "third"]


def test_timers_with_the_same_deadline_run_in_the_order_they_were_set(loop: IOLoop) -> None:
    ran: list[int] = []
    for i in range(5):
        loop.call_later(0, functools.partial(ran.append, i))
    loop.call_later(0, loop.stop)

    run_until_stopped(loop)

    assert ran == [0, 1, 2, 3, 4]


def test_a_cancelled_timer_does_not_run(loop: IOLoop) -> None:
    ran: list[str] = []
    loop.call_later(0.001, lambda: ran.append("cancelled")).cancel()
    loop.call_later(0.002, lambda: ran.append("kept"))
    loop.call_later(0.003, loop.stop)

    run_until_stopped(loop)

    assert ran == ["kept"]


def test_a_timer_can_set_another_timer(loop: IOLoop) -> None:
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        loop.call_later(0, then_stop(loop, lambda: ran.append("chained")))

    loop.call_later(0, first)

    run_until_stopped(loop)

    assert ran == ["first", "chained"]


def test_a_timer_can_cancel_a_later_timer(loop: IOLoop) -> None:
    ran: list[str] = []
    doomed = loop.call_later(0.002, lambda: ran.append("doomed"))
    loop.call_later(0, doomed.cancel)
    loop.call_later(0.003, loop.stop)

    run_until_stopped(loop)

    assert ran == []


# ---- other threads --------------------------------------------------------------


def test_call_soon_threadsafe_from_another_thread_wakes_an_idle_loop(loop: IOLoop) -> None:
    # With no timers the loop polls without a timeout: only the wake-up can end the poll.
    ran_on: list[int] = []
    thread = start(loop)

    loop.call_soon_threadsafe(then_stop(loop, lambda: ran_on.append(threading.get_ident())))

    join(loop, thread)
    assert ran_on == [thread.ident]


def test_stop_from_another_thread_ends_run(loop: IOLoop) -> None:
    is_running = threading.Event()
    loop.call_soon_threadsafe(is_running.set)
    thread = start(loop)
    assert is_running.wait(JOIN_TIMEOUT_S)

    loop.stop()

    join(loop, thread)


def test_calls_from_many_threads_all_run_in_each_threads_order(loop: IOLoop) -> None:
    n_threads, n_calls = 4, 200
    ran: list[tuple[int, int]] = []
    thread = start(loop)

    def hand_over(t: int) -> None:
        for i in range(n_calls):
            loop.call_soon_threadsafe(functools.partial(ran.append, (t, i)))

    senders = [threading.Thread(target=hand_over, args=(t,)) for t in range(n_threads)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(JOIN_TIMEOUT_S)
    loop.stop()

    join(loop, thread)
    assert len(ran) == n_threads * n_calls
    for t in range(n_threads):
        assert [i for tt, i in ran if tt == t] == list(range(n_calls))


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux pipe sizing")
def test_call_soon_threadsafe_survives_a_full_wake_up_pipe(loop: IOLoop) -> None:
    # Shrink the wake-up pipe to one page so that filling it stays fast.
    pipe_nbytes = fcntl.fcntl(loop._wake_w, fcntl.F_SETPIPE_SZ, 4096)
    n_calls = pipe_nbytes + 100
    count = 0

    def bump() -> None:
        nonlocal count
        count += 1

    for _ in range(n_calls):
        loop.call_soon_threadsafe(bump)
    loop.stop()

    run_until_stopped(loop)

    assert count == n_calls


# ---- faults ---------------------------------------------------------------------


def test_an_exception_in_a_callback_is_logged_and_the_loop_keeps_running(
    loop: IOLoop, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise ValueError("bug in a callback")

    loop.call_soon_threadsafe(broken)
    loop.call_later(0, broken)
    loop.call_later(0.001, then_stop(loop, lambda: ran.append("after")))

    with caplog.at_level(logging.ERROR, logger="jupyter_dist.ioloop"):
        run_until_stopped(loop)

    assert ran == ["after"]
    records = [r for r in caplog.records if r.name == "jupyter_dist.ioloop"]
    assert len(records) == 2
    for record in records:
        assert record.levelno == logging.ERROR
        assert "error in I/O loop callback" in record.getMessage()
        assert record.exc_info is not None
        assert record.exc_info[0] is ValueError


# ---- sockets --------------------------------------------------------------------


def test_a_socket_reader_gets_each_message_that_arrives_as_frames(
    loop: IOLoop, pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]
) -> None:
    out, into = pair
    received: list[list[bytes]] = []

    def on_message(frames: list[zmq.Frame]) -> None:
        assert all(isinstance(f, zmq.Frame) for f in frames)
        received.append([f.bytes for f in frames])
        if len(received) == 2:
            loop.stop()

    loop.add_socket(into, on_message)
    thread = start(loop)

    out.send_multipart([b"hello", b"loop"])
    out.send(b"again")

    join(loop, thread)
    assert received == [[b"hello", b"loop"], [b"again"]]


def test_a_reader_that_raises_is_logged_and_still_gets_the_next_message(
    loop: IOLoop,
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out, into = pair
    received: list[bytes] = []

    def on_message(frames: list[zmq.Frame]) -> None:
        received.append(frames[0].bytes)
        if frames[0].bytes == b"bad":
            raise KeyError("malformed")
        loop.stop()

    loop.add_socket(into, on_message)
    out.send(b"bad")
    out.send(b"good")

    with caplog.at_level(logging.ERROR, logger="jupyter_dist.ioloop"):
        run_until_stopped(loop)

    assert received == [b"bad", b"good"]
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [KeyError]


def test_a_flooded_socket_yields_to_timers_after_a_batch(
    loop: IOLoop, pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]
) -> None:
    out, into = pair
    n_messages = MAX_BATCH + 10
    received: list[int] = []
    received_before_timer: list[int] = []

    def on_message(frames: list[zmq.Frame]) -> None:
        received.append(int(frames[0].bytes))
        if len(received) == n_messages:
            loop.stop()

    for i in range(n_messages):
        out.send(b"%d" % i)
    assert into.poll(int(JOIN_TIMEOUT_S * 1000))
    loop.add_socket(into, on_message)
    loop.call_later(0, lambda: received_before_timer.append(len(received)))

    run_until_stopped(loop)

    assert received == list(range(n_messages))
    assert received_before_timer
    assert received_before_timer[0] <= MAX_BATCH


def test_a_removed_socket_is_no_longer_read(
    loop: IOLoop, pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]
) -> None:
    out, into = pair
    calls: list[list[zmq.Frame]] = []
    loop.add_socket(into, calls.append)
    loop.remove_socket(into)
    out.send(b"unread")
    assert into.poll(int(JOIN_TIMEOUT_S * 1000))  # the message is there to be read
    loop.call_soon_threadsafe(loop.stop)

    run_until_stopped(loop)

    assert calls == []
    assert into.recv(zmq.NOBLOCK) == b"unread"
    loop.remove_socket(into)  # removing twice is harmless


# ---- the end of a turn -------------------------------------------------------------


def test_at_turn_end_runs_after_the_turns_calls_and_timers(loop: IOLoop) -> None:
    # An Outbox flushes here: what a turn's callbacks put must all be there first.
    events: list[str] = []
    loop.at_turn_end(lambda: events.append("end"))
    loop.call_soon_threadsafe(lambda: events.append("call 1"))
    loop.call_soon_threadsafe(lambda: events.append("call 2"))
    loop.call_later(0, lambda: events.append("timer"))
    loop.call_soon_threadsafe(loop.stop)

    run_until_stopped(loop)

    assert events[:5] == ["end", "call 1", "call 2", "timer", "end"]  # before the first poll too
    assert events[-1] == "end"  # the turn that stopped the loop flushed too


def test_at_turn_end_runs_before_the_first_poll(loop: IOLoop) -> None:
    # An engine sends its registration before run(): it must not wait for the first timer.
    events: list[str] = []
    loop.at_turn_end(lambda: events.append("end"))
    is_flushed = threading.Event()
    loop.at_turn_end(is_flushed.set)
    loop.call_later(3600, loop.stop)  # the only timer: a poll would sleep until then
    thread = start(loop)

    assert is_flushed.wait(JOIN_TIMEOUT_S)
    loop.stop()
    join(loop, thread)
    assert events[0] == "end"


def test_a_file_reader_runs_while_its_file_is_readable_until_removed(loop: IOLoop) -> None:
    read_fd, write_fd = os.pipe()
    seen: list[bytes] = []

    def on_readable() -> None:
        chunk = os.read(read_fd, 100)
        if chunk:
            seen.append(chunk)
        else:  # the writer closed: nothing more will come
            loop.remove_reader(read_fd)
            loop.stop()

    loop.add_reader(read_fd, on_readable)
    thread = start(loop)
    os.write(write_fd, b"exited 42\n")
    os.close(write_fd)
    join(loop, thread)
    os.close(read_fd)
    assert seen == [b"exited 42\n"]


def test_a_stop_after_the_loop_closed_writes_nowhere() -> None:
    # A client's close() can race its I/O thread ending the loop itself (the controller
    # gone): the stop must not write to the closed pipe, nor to a file reusing its number.
    loop = IOLoop()
    loop.close()
    read_end, write_end = os.pipe()  # likely takes the numbers the wake-up pipe had
    try:
        loop.stop()
        loop.close()
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.close(write_end)
