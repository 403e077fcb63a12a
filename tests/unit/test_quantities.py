"""Sizes and durations written as text: what users may type for a memory limit or an idle timeout."""

from __future__ import annotations

import argparse

import pytest

from jupyter_dist.quantities import (
    argument_type,
    format_duration,
    format_nbytes,
    parse_duration_s,
    parse_nbytes,
)


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
    parser.add_argument("--idle-timeout", type=argument_type(parse_duration_s))
    assert parser.parse_args(["--idle-timeout", "2h"]).idle_timeout == 7200.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"30m, 1h30m, 2d"):
        argument_type(parse_duration_s)("tomorrow")


@pytest.mark.parametrize(
    ("seconds", "text"), [(45.2, "45s"), (723, "12m 03s"), (3900, "1h 05m"), (-1, "0s")]
)
def test_durations_read_well(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "nbytes"),
    [
        ("2GB", 2_000_000_000),
        ("512MB", 512_000_000),
        ("1.5GiB", 3 * 2**29),
        ("2 gb", 2_000_000_000),
        (" 300 MiB ", 300 * 2**20),
        ("64kB", 64_000),
        ("64KiB", 65_536),
        ("1TB", 10**12),
        (".5GB", 500_000_000),
        ("4096", 4096),
        ("100B", 100),
        (2_000_000_000, 2_000_000_000),
        (2e9, 2_000_000_000),
    ],
)
def test_sizes_in_every_accepted_form_are_parsed(size: int | float | str, nbytes: int) -> None:
    assert parse_nbytes(size) == nbytes


@pytest.mark.parametrize(
    "size", ["2G", "2 gigabytes", "GB", "", "1e9", "-1GB", "two GB", "1.2.3MB", float("nan"), True]
)
def test_a_malformed_size_says_which_forms_are_accepted(size: object) -> None:
    with pytest.raises(ValueError, match=r"not a size: give .*\"2GB\", \"512MB\" or \"1\.5GiB\""):
        parse_nbytes(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -5, "0MB", 0.4])
def test_a_size_must_be_positive(size: int | float | str) -> None:
    with pytest.raises(ValueError, match="more than 0 bytes"):
        parse_nbytes(size)


@pytest.mark.parametrize(
    ("nbytes", "like", "shown"),
    [
        (2_100_000_000, None, "2.1 GB"),
        (2_000_000_000, None, "2 GB"),
        (3 * 2**29, None, "1.5 GiB"),
        (612_345_678, None, "612 MB"),
        (999_960_000, None, "1 GB"),  # rounded up a unit, not "1e+03 MB"
        (800, None, "800 B"),
        (1_700_000_000, 3 * 2**29, "1.58 GiB"),  # a usage shown in its limit's units
        (2_134_000_000, 2_000_000_000, "2.13 GB"),
    ],
)
def test_sizes_are_shown_in_the_family_they_were_given_in(
    nbytes: int, like: int | None, shown: str
) -> None:
    assert format_nbytes(nbytes, like=like) == shown
