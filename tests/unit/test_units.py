"""Durations written as text: what users may type for an idle timeout."""

from __future__ import annotations

import argparse

import pytest

from jupyter_dist.units import duration_argument, format_duration, parse_duration_s


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (2.5, 2.5),
        ("90", 90.0),
        ("30m", 1800.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        (" 1.5 H ", 5400.0),
    ],
)
def test_durations_read_as_seconds(value: float | str, seconds: float) -> None:
    assert parse_duration_s(value) == seconds


@pytest.mark.parametrize("value", ["soon", "30 minutes", "5x", "", "0", -3, True, None])
def test_a_bad_duration_names_the_accepted_forms(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_s(value)  # type: ignore[arg-type]


def test_as_a_command_line_option_a_bad_duration_is_a_usage_error() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-timeout", type=duration_argument)
    assert parser.parse_args(["--idle-timeout", "2h"]).idle_timeout == 7200.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"30m, 1h30m, 2d"):
        duration_argument("tomorrow")


@pytest.mark.parametrize(
    ("seconds", "text"), [(45.2, "45s"), (723, "12m 03s"), (3900, "1h 05m"), (-1, "0s")]
)
def test_durations_read_well(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
